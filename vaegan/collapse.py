"""Seeing a collapse while the run goes on: the reconstruction error of a fixed batch, checked now and then.

Adversarial training is noisy, and its losses say little about whether the decoder still
reconstructs: at batch 16 the VAE/GAN's decoder was seen to turn into one whose every output is
nearly the same image, in one run of three on 28x28 photographs of objects (bench/collapse.py
measures how often on the digits). The check encodes a fixed batch of the run's images, decodes
the posterior means with the model as a checkpoint holds it (eval mode, the running BatchNorm
statistics) and reports the pixel error relative to the batch's own mean image (1.0: no better
than drawing the mean image for every input). A collapse is an error far above the best the run
has reached; the run says so once, with the step and the last checkpoint saved while the check
was still good, and says again only after the error has come back down.
"""
import os

import torch

CHECK_IMAGES = 64
# A collapse: worse than drawing the mean image, and over twice the best error so far. In six healthy runs of small
# networks at batch 16 (bench/results/collapse-20261205/) a check rose to at most 1.66 times the best before it,
# early, while the running statistics lag the weights; in the paper networks' (collapse-paper-20261205/) to 2.80
# times, but below 1 (0.84); the collapse reported on another image set rose 3-4 times. A collapse before the
# reconstructions were ever good (the early ones of bench/results/collapse-early-20261205/) is not seen.
COLLAPSED_ERROR = 1.0
COLLAPSED_OVER_BEST = 2.0


def check_batch(dataset, count=CHECK_IMAGES):
    """(images, their rows of the attribute table): `count` images spread evenly over the dataset, unflipped."""
    n = min(count, len(dataset))
    items = [dataset[(i * len(dataset) // n, False)] for i in range(n)]
    return torch.stack([item[0] for item in items]), torch.stack([item[1] for item in items])


@torch.no_grad()
def relative_reconstruction_error(model, images, attributes=None):
    """Pixel MSE of Dec(mu(x)) over the MSE of the batch's mean image, in eval mode (running statistics),
    the model's mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        mu, _ = model.encoder(images, attributes)
        reconstructions = model.decoder(mu, attributes).float()
    finally:
        model.train(was_training)
    images = images.float()
    spread = (images - images.mean(0)).pow(2).mean()
    return float((reconstructions - images).pow(2).mean() / spread)


def collapsed(error, best):
    return error > COLLAPSED_ERROR and error > COLLAPSED_OVER_BEST * best


class CollapseWatch:
    """Checks the reconstructions every `every` steps (and before each checkpoint) and remembers which
    checkpoints were saved while they were good. `check(step, report)` -> the error; a collapse is
    reported as one line through `report`."""

    def __init__(self, model, dataset, every, attribute_columns=None):
        self.model, self.every = model, every
        param = next(model.parameters())
        images, attributes = check_batch(dataset)
        self.images = images.to(param)
        self.attributes = None if attribute_columns is None else attributes[:, attribute_columns].to(param)
        self.best = self.best_step = None
        self.last = None             # (step, error, collapsed) of the latest check
        self.good_save = None        # the step of the latest save while good
        self.good_kept = None        # (step, path) of the latest kept checkpoint-STEP.pt saved while good
        self.latest = None           # (step, path, good) of the latest write of checkpoint.pt

    def due(self, step):
        return self.every > 0 and step % self.every == 0

    def check(self, step, report):
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        error = relative_reconstruction_error(self.model, self.images, self.attributes)
        bad = self.best is not None and collapsed(error, self.best)
        if bad and not (self.last and self.last[2]):  # once per collapse, until the error comes back down
            report(f"vaegan: step {step}: the reconstructions collapsed: error {error:.2f} on the fixed check "
                   f"batch (1.0: the mean image), best {self.best:.2f} at step {self.best_step}; "
                   f"{self.last_good_checkpoint()}")
        if not bad and (self.best is None or error < self.best):
            self.best, self.best_step = error, step
        self.last = (step, error, bad)
        return error

    def saved(self, step, paths):
        """A checkpoint was written at `step` to `paths` (checkpoint.pt, and a kept copy at kept steps)."""
        good = self.last is not None and self.last[0] == step and not self.last[2]  # checked at this step, good
        if good:
            self.good_save = step
            kept = [p for p in paths if os.path.basename(p) != "checkpoint.pt"]
            if kept:
                self.good_kept = (step, kept[0])
        latest = [p for p in paths if os.path.basename(p) == "checkpoint.pt"]
        if latest:
            self.latest = (step, latest[0], good)

    def last_good_checkpoint(self):
        kept = f"{self.good_kept[1]} (step {self.good_kept[0]})" if self.good_kept else None
        if self.latest is not None and self.latest[2] and (kept is None or self.latest[0] > self.good_kept[0]):
            step, path, _ = self.latest
            return (f"the last good checkpoint is {path} (step {step}; the next save overwrites it)"
                    + (f", the last good one kept is {kept}" if kept else ", and none good is kept (--keep-every)"))
        if kept:
            return f"the last good checkpoint is {kept}"
        if self.good_save is not None:
            return f"the last good checkpoint (step {self.good_save}) has been overwritten since (--keep-every keeps copies)"
        return "no checkpoint was saved while the check was good"
