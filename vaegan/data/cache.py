"""The decoded data set held in memory (--data-cache gpu|host).

Every image file is decoded once (ImageFiles.decode: CelebA's whole 178x218 image, a folder's square
at datasets.decoded_side), by a pool of threads (PIL releases the GIL while it decodes), into one
uint8 tensor (N, H, W, C): on the GPU, or in host memory (pinned on CUDA machines, its exact size). A
step is then an index into it (the sampler's, unchanged) and the batched preprocessing on the device
(loader.BatchPreprocess): no decoding and no worker processes while training.

A file that cannot be decoded is found here, once: its row stays empty and the index maps to the
next readable file, as ImageFiles.__getitem__ substitutes it (so the batches are the same as the
per-image loader's), and its path is reported with every batch that draws it, as there.

How much memory it may take (options.resolve_data_cache): under --data-cache auto, at most
GPU_SHARE of the device's free memory (the rest is the model's, its activations' and the compiled
step's), else at most HOST_SHARE of the host's available memory (MemAvailable in /proc/meminfo,
shared among the processes of the node: each holds its own copy); an explicit choice may take all
of it, and fails with the sizes where the images do not fit at all. On CPUs auto does not cache:
there the preprocessing would run between steps in the main process, where DataLoader workers run
it beside the step (on 2 cores at 64 px, batch 32, width 0.25: 100 img/s with workers, 70 with a
host cache).
"""
import concurrent.futures
import os
import sys
import time
import weakref

import torch
from tqdm import tqdm

from .datasets import UNREADABLE_ERRORS, DataError
from .loader import DeviceBatch, labels_of, to_device

GPU_SHARE = 0.5
HOST_SHARE = 0.5
CHUNK = 1024  # images decoded between two copies to the GPU (through a pinned staging buffer)
CHOICES = ("auto", "gpu", "host", "none")


def free_device_bytes(device):
    return torch.cuda.mem_get_info(device)[0]


def available_host_bytes():
    """MemAvailable of /proc/meminfo, divided among the processes torchrun started on this node; None
    where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def decoded_bytes(dataset, augment):
    height, width, channels = dataset.decoded_shape(augment)
    return len(dataset) * height * width * channels


def gigabytes(count):
    return f"{count / 1e9:.2f} GB"


def pinned_empty(shape):
    """An uint8 tensor of `shape` in page-locked host memory, exactly its size: one plain allocation registered
    with CUDA (cudaHostRegister). torch's pin_memory goes through the caching host allocator, which rounds an
    allocation up to the next power of two (CelebA's 21.3 GB decoded would take 34.4 GB of pinned memory).
    Unregistered when the tensor is freed."""
    images = torch.empty(shape, dtype=torch.uint8)
    size = images.numel()
    if size == 0:
        return images
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(images.data_ptr(), size, 0)
    if int(error) != 0:
        raise DataError(f"--data-cache host: cannot pin {gigabytes(size)} of host memory for the decoded images "
                        f"(cudaHostRegister: error {int(error)}); use --data-cache none, or free memory")
    weakref.finalize(images, cudart.cudaHostUnregister, images.data_ptr())
    return images


class DecodedCache:
    """images: uint8 (N, H, W, C); source: int64 (N,), the row that stands for each index (itself, or
    the next readable one); unreadable: for each index, the files skipped in its place ("path (error)")."""

    def __init__(self, images, source, unreadable, seconds):
        self.images, self.source, self.unreadable, self.seconds = images, source, unreadable, seconds

    @classmethod
    def decode(cls, dataset, where, device, threads=1, progress=True):
        """Decode every file of `dataset` (ImageFiles) into a cache on the GPU (`where` "gpu": `device`)
        or in host memory ("host"; pinned when `device` is CUDA)."""
        device = torch.device(device)
        shape, count = dataset.decoded_shape(), len(dataset)
        if where == "gpu":
            images = torch.empty((count, *shape), dtype=torch.uint8, device=device)
            staging = torch.empty((min(CHUNK, count), *shape), dtype=torch.uint8, pin_memory=True)
        else:
            images = pinned_empty((count, *shape)) if device.type == "cuda" else torch.empty((count, *shape),
                                                                                            dtype=torch.uint8)
            staging = None
        errors = {}

        def decode_into(target, index):
            try:
                target.copy_(torch.from_numpy(dataset.decode(index)))
            except UNREADABLE_ERRORS as e:
                errors[index] = f"{dataset.paths[index]} ({e})"

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool, \
                tqdm(total=count, unit="img", desc="vaegan: decoding the data set", disable=not progress,
                     file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
            for first in range(0, count, CHUNK):
                last = min(count, first + CHUNK)
                target = staging if staging is not None else images[first:last]
                jobs = [pool.submit(decode_into, target[i - first], i) for i in range(first, last)]
                for job in concurrent.futures.as_completed(jobs):
                    job.result()
                    bar.update(1)
                if staging is not None:
                    images[first:last].copy_(staging[:last - first])
        if len(errors) == count:
            raise DataError(f"{dataset.name}: no image could be read (first failure: {errors[0]})")
        source, unreadable = list(range(count)), [()] * count
        for index in sorted(errors):  # ImageFiles.first_readable's rule: the next readable file in order
            candidate, skipped = index, []
            while candidate in errors:
                skipped.append(errors[candidate])
                candidate = (candidate + 1) % count
            source[index], unreadable[index] = candidate, tuple(skipped)
        return cls(images, torch.tensor(source, dtype=torch.int64), unreadable, time.perf_counter() - start)


class CachedLoader:
    """Iterates (float images on `device`, attributes, unreadable) for the sampler's steps: the cache's
    rows of each step's images, preprocessed in one batch on `device`. Per step the host sends the
    device one pinned copy of the batch's labels (rows and flips), and the selected images too where
    the cache is in host memory; the attributes are read from a copy of their table on the device."""

    num_workers = 0

    def __init__(self, cache, dataset, sampler, device, preprocess=None):
        self.cache, self.dataset, self.sampler = cache, dataset, sampler
        self.device = torch.device(device)
        self.finish = DeviceBatch(dataset, self.device, preprocess)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        images = self.cache.images
        for batch in self.sampler:
            indices = [index for index, _, _ in batch]
            rows = self.cache.source[indices]  # host memory: no device involved
            labels = labels_of(rows, [bool(flip) for _, flip, _ in batch])
            if images.device.type == self.device.type:  # on the device already (or a CPU run's host cache)
                labels = to_device(labels, self.device)
                selected = images.index_select(0, labels[:, 0])
            else:
                selected = to_device(images.index_select(0, rows), self.device)
                labels = to_device(labels, self.device)
            unreadable = [path for index in indices for path in self.cache.unreadable[index]]
            yield (*self.finish(selected, labels, [place for _, _, place in batch]), unreadable)
