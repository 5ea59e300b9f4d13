"""Training: truncated BPTT, optimizers, clipping, learning-rate schedules, and a run's files."""
