"""The learning rate over a run: the authors' annealing (the authors' `aegan.py`: GammaAnnealer(0.025, 1e-5, 250, 0.75) / 64) or a constant.

The authors' code (aegan.train, DeepPy's GammaAnnealer(0.025, 1e-5, 250, gamma=0.75), divided by
the batch of 64) sets the rate once per 250-step epoch, for 250 epochs:
    lr(e) = lr_start - (e / 250) ** 0.75 * (lr_start - lr_end),  e = 0 .. 249,
lr_start = 0.025 / 64 = 3.9e-4 and lr_end = 1e-5 / 64: 1.6e-4 half way, 1.3e-6 in the last epoch.
Over a run of any length the rate changes at the same fractions of it: 250 equal pieces of the
steps the schedule spans (--lr-schedule-steps, by default the run's --steps; kept on resume).
"""
SCHEDULES = ("authors", "constant")
AUTHORS_LR = 0.025 / 64
PIECES = 250
END_FRACTION = 1e-5 / 0.025  # lr_end / lr_start
POWER = 0.75


def learning_rate(schedule, lr, step, steps):
    """The rate for step `step` (0-based) of a schedule spanning `steps` steps that starts at `lr`;
    past its end, the last piece's rate."""
    if schedule == "constant":
        return lr
    piece = min(PIECES - 1, step * PIECES // steps)
    return lr - (piece / PIECES) ** POWER * (lr - lr * END_FRACTION)
