"""Batches for training: a deterministic order that depends only on (seed, step).

Step s of a run takes batch s mod E of epoch s div E (E = steps per epoch), out of a permutation
of the whole data set drawn from (seed, epoch); the flips are drawn from the same pair. The
global batch is cut into one contiguous slice per rank, so ranks see disjoint images and
together see exactly what one process with the global batch sees. Nothing depends on the
number of workers, and a resumed run continues mid-epoch exactly where it stopped. The images
left over after the last full global batch of an epoch are not used in that epoch (a fresh
permutation is drawn for the next).
"""
import torch

from .datasets import DataError


def epoch_generator(seed, epoch):
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for steps start..end-1, this rank's list of (image index, flip, (seed, step, slot)): the
    last names the image's place in the run, from which its augmentation is drawn (vaegan/data/augment.py)."""

    def __init__(self, num_images, batch_size, rank, world_size, seed, start_step, end_step, flip=True):
        self.num_images, self.batch_size, self.rank, self.world_size = num_images, batch_size, rank, world_size
        self.seed, self.start_step, self.end_step, self.flip = seed, start_step, end_step, flip
        self.global_batch = batch_size * world_size
        if num_images < self.global_batch:
            raise DataError(f"the data has {num_images} images, fewer than one global batch "
                            f"({batch_size} x {world_size} processes)")
        self.steps_per_epoch = num_images // self.global_batch

    def epoch_order(self, epoch):
        generator = epoch_generator(self.seed, epoch)
        order = torch.randperm(self.num_images, generator=generator)
        flips = torch.rand(self.num_images, generator=generator) < 0.5
        return order.tolist(), (flips.tolist() if self.flip else [False] * self.num_images)

    def __len__(self):
        return self.end_step - self.start_step

    def __iter__(self):
        cached_epoch, order, flips = None, None, None
        for step in range(self.start_step, self.end_step):
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, (order, flips) = epoch, self.epoch_order(epoch)
            start = position * self.global_batch + self.rank * self.batch_size
            first_slot = self.rank * self.batch_size
            yield [(i, flips[i], (self.seed, step, first_slot + j))
                   for j, i in enumerate(order[start:start + self.batch_size])]


def collate(samples):
    images = torch.stack([s[0] for s in samples])
    attributes = torch.stack([s[1] for s in samples])
    unreadable = [path for s in samples for path in s[2]]
    return images, attributes, unreadable


PREFETCH_PER_WORKER = 4  # batches each worker keeps ready


def make_loader(dataset, sampler, workers, pin_memory=False):
    workers = 0 if dataset.in_memory else workers
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       collate_fn=collate, pin_memory=pin_memory,
                                       prefetch_factor=PREFETCH_PER_WORKER if workers else None)
