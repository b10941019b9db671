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
from .device_preprocess import draw_batch, preprocess_batch


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

    def batch_at(self, step, epoch_order=None):
        """This rank's list for `step` (any step, not only start..end-1); epoch_order: the step's epoch's
        epoch_order, where the caller holds it."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order, flips = epoch_order or self.epoch_order(epoch)
        start = position * self.global_batch + self.rank * self.batch_size
        first_slot = self.rank * self.batch_size
        return [(i, flips[i], (self.seed, step, first_slot + j))
                for j, i in enumerate(order[start:start + self.batch_size])]

    def __iter__(self):
        cached_epoch, orders = None, None
        for step in range(self.start_step, self.end_step):
            epoch = step // self.steps_per_epoch
            if epoch != cached_epoch:
                cached_epoch, orders = epoch, self.epoch_order(epoch)
            yield self.batch_at(step, orders)


def on_host(device):
    return torch.device(device).type == "cpu"


def to_device(tensor, device):
    """A batch's tensor on `device`. From the host it is copied out of pinned memory without waiting
    (pinned here if the loader did not pin it): a copy from pageable memory would make the host wait
    for everything queued on the device, so the next batch would be prepared only after the step."""
    device = torch.device(device)
    if on_host(device) or not on_host(tensor.device):
        return tensor
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def labels_of(rows, flips):
    """int64 (B, 2): each image's row of the attribute table and its flip bit, one small tensor so that
    a batch's bookkeeping reaches the device in one copy."""
    return torch.stack([torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(flips, dtype=torch.int64)], 1)


class BatchPreprocess:
    """(uint8 (B, H, W, C) decoded images, flips, places) -> the float batch (B, C, size, size) in [-1, 1]:
    device_preprocess.preprocess_batch on the images' device, with the authors' augmentation drawn
    there from each image's (seed, step, slot) when `augment`. The one preprocessing of every loader
    (PIL workers, the main process, the decoded cache, DALI). flips: bool (B,) on the images' device."""

    def __init__(self, image_size, channels, celeba, augment, dtype=torch.float32):
        self.image_size, self.channels, self.celeba = image_size, channels, celeba
        self.augment, self.dtype = augment, dtype

    @classmethod
    def of(cls, dataset, dtype=torch.float32):
        return cls(dataset.image_size, dataset.channels, dataset.celeba, dataset.augment, dtype)

    def __call__(self, images, flips, places):
        augmentations = draw_batch(places, images.device) if self.augment else None
        return preprocess_batch(images, self.image_size, self.channels, self.celeba, augmentations,
                                torch.as_tensor(flips, dtype=torch.bool), self.dtype)


class DeviceBatch:
    """A loader's last stage: (images on the device, labels on the device, places) -> (float batch,
    attributes, ...), with the data set's attribute table copied to the device once."""

    def __init__(self, dataset, device, preprocess=None):
        self.device = torch.device(device)
        self.preprocess = preprocess or BatchPreprocess.of(dataset)
        self.attributes = dataset.attributes.to(self.device)

    def __call__(self, images, labels, places):
        """images: uint8 (B, H, W, C) and labels: labels_of's, both on the device."""
        return (self.preprocess(images, labels[:, 1].bool(), places),
                self.attributes.index_select(0, labels[:, 0]))


class DecodedFiles(torch.utils.data.Dataset):
    """ImageFiles as the loader reads them: (uint8 (H, W, C) decoded image, attribute row, unreadable,
    flip, place), an unreadable file replaced by the next readable one as in ImageFiles.__getitem__."""

    in_memory = False

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        index, flip, place = item
        array, candidate, unreadable = self.files.first_readable(index, self.files.decode)
        return torch.from_numpy(array), candidate, unreadable, flip, place


def collate(samples):
    images = torch.stack([s[0] for s in samples])
    attributes = torch.stack([s[1] for s in samples])
    unreadable = [path for s in samples for path in s[2]]
    return images, attributes, unreadable


class CollateDecoded:
    """Stacks DecodedFiles' samples into (uint8 batch, labels (labels_of), unreadable, places); with a
    BatchPreprocess (CPU runs: in the worker), the float batch in the first place instead."""

    def __init__(self, preprocess=None):
        self.preprocess = preprocess

    def __call__(self, samples):
        images = torch.stack([s[0] for s in samples])
        labels = labels_of([s[1] for s in samples], [bool(s[3]) for s in samples])
        unreadable = [path for s in samples for path in s[2]]
        places = [s[4] for s in samples]
        if self.preprocess is not None:
            images = self.preprocess(images, labels[:, 1].bool(), places)
        return images, labels, unreadable, places


class DecodingLoader:
    """Iterates (float images, attributes, unreadable) from DataLoader workers that decode image files.
    On a CPU the workers preprocess too (the same function on CPU tensors, in parallel, one thread
    each: this was faster on 2 cores than the main process preprocessing between steps); on a device
    they hand uint8 batches and their labels, pinned by the DataLoader, which are copied to the device
    without waiting and preprocessed there in one batch."""

    def __init__(self, dataset, sampler, workers, device, preprocess=None):
        self.device = torch.device(device)
        self.in_workers = on_host(self.device)
        self.finish = DeviceBatch(dataset, self.device, preprocess)
        self.loader = torch.utils.data.DataLoader(
            DecodedFiles(dataset), batch_sampler=sampler, num_workers=workers,
            collate_fn=CollateDecoded(self.finish.preprocess if self.in_workers else None),
            pin_memory=not self.in_workers, prefetch_factor=PREFETCH_PER_WORKER if workers else None,
            persistent_workers=False)
        self.num_workers = workers

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, labels, unreadable, places in self.loader:
            if self.in_workers:
                yield images, self.finish.attributes.index_select(0, labels[:, 0]), unreadable
            else:
                yield (*self.finish(to_device(images, self.device), to_device(labels, self.device), places),
                       unreadable)


PREFETCH_PER_WORKER = 4  # batches each worker keeps ready


def make_loader(dataset, sampler, workers, pin_memory=False, device="cpu"):
    """The PIL loader. Image files (datasets.ImageFiles): decoded in `workers` processes and preprocessed
    in batches (DecodingLoader). Other datasets (the built-in faces, held preprocessed: flips only; a
    view such as the regressor's) yield their own items, collated, in the main process when in memory."""
    if hasattr(dataset, "decode"):
        return DecodingLoader(dataset, sampler, workers, device)
    workers = 0 if dataset.in_memory else workers
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       collate_fn=collate, pin_memory=pin_memory,
                                       prefetch_factor=PREFETCH_PER_WORKER if workers else None)
