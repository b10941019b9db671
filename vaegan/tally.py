"""What the training loop reports, kept on the device between the steps that read it.

Every step adds its decisions here without a device-to-host copy; a log step (or a checkpoint)
reads everything at once: the step's losses, the skips since the last read and since the start,
and the first step whose losses or gradients were not finite (which updated nothing).
"""
import torch

SKIPPABLE = ("decoder", "discriminator")


class StepTally:
    def __init__(self, device, loss_names, skips_so_far):
        self.loss_names = loss_names
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.interval = {name: zero.clone() for name in SKIPPABLE}
        self.total = {name: zero + skips_so_far[name] for name in SKIPPABLE}
        self.first_bad_step = zero - 1
        self.bad_losses = torch.zeros(len(loss_names), device=device)
        self.last_update = self.last_stats = None

    def add(self, outcome):
        """A step's TrainStep outcome: step, a 0-d int64 tensor; stats, 0-d tensors; update, {network: 0-d
        bool}; finite, 0-d bool."""
        step, stats, update, finite = outcome
        for name in SKIPPABLE:
            if name in update:
                skipped = (finite & ~update[name]).to(torch.int64)  # by the equilibrium rule
                self.interval[name] += skipped
                self.total[name] += skipped
        first = ~finite & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)
        losses = torch.stack([stats[n].float() if n in stats else self.bad_losses.new_zeros(())
                              for n in self.loss_names])
        self.bad_losses = torch.where(first, losses, self.bad_losses)
        self.last_update, self.last_stats = update, stats

    def read(self, new_interval=True):
        """One copy to the host: {the last step's stat: float}, {network: updated at the last step},
        skips in the interval, skips in all, and (first bad step, its losses) or None."""
        stats = self.last_stats
        names = [n for n in self.loss_names if n in stats]
        updates = [name for name in SKIPPABLE if self.last_update and name in self.last_update]
        empty = self.bad_losses.new_zeros(0, dtype=torch.float64)
        values = torch.cat([torch.stack([stats[n].double() for n in names]) if names else empty,
                            torch.stack([self.last_update[n].double() for n in updates]) if updates else empty,
                            torch.stack([self.interval[n].double() for n in SKIPPABLE]),
                            torch.stack([self.total[n].double() for n in SKIPPABLE]),
                            self.first_bad_step.double().reshape(1), self.bad_losses.double()])
        values = values.tolist()  # the only synchronisation between log steps
        take = lambda n: [values.pop(0) for _ in range(n)]  # noqa: E731
        current = dict(zip(names, take(len(names))))
        updated = {n: bool(v) for n, v in zip(updates, take(len(updates)))}
        interval = dict(zip(SKIPPABLE, (int(v) for v in take(len(SKIPPABLE)))))
        total = dict(zip(SKIPPABLE, (int(v) for v in take(len(SKIPPABLE)))))
        first_bad = int(take(1)[0])
        bad = (first_bad, dict(zip(self.loss_names, values))) if first_bad >= 0 else None
        if new_interval:
            for name in SKIPPABLE:
                self.interval[name].zero_()
        return current, updated, interval, total, bad
