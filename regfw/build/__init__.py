"""Building what a fit needs from a validated config: built-in datasets and models, user classes by path."""
