"""What each uncertainty score is called on a figure: the quantity, never a bare key.

The keys (``msp``, ``mutual_information``, ...) are the names of the metrics and the config;
a reader of a figure gets what the number is, e.g. ``1 - max prob`` for the ``msp`` OOD score
(higher means less sure, like every score here).
"""
from __future__ import annotations

__all__ = ["score_label"]

_LABELS = {
    "msp": "1 - max prob",
    "entropy": "predictive entropy (nats)",
    "mutual_information": "mutual information (nats)",
    "bald": "mutual information (nats)",
    "variation_ratio": "variation ratio (1 - modal vote share)",
    "energy": "energy (-logsumexp of the logits)",
}
_VARIANCE = {"classification": "summed variance of the class probabilities", "regression": "predictive variance"}


def score_label(name: str, task: str = "classification") -> str:
    """The axis label of the uncertainty score ``name`` (a key of the metrics and the config);
    ``variance`` depends on the ``task``; an unknown key is shown with spaces for underscores."""
    if name == "variance":
        return _VARIANCE.get(task, "variance")
    return _LABELS.get(name, name.replace("_", " "))
