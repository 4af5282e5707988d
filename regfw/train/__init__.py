"""Training with regularizers under Lightning: the module, the Regularize callback, steps, losses,
optimizers and rate schedules."""
