"""NVIDIA DALI loader: JPEG/PNG decoding (nvJPEG on the GPU), crop, low-pass, resize and flip.

The order is the one the PIL loader uses (vaegan/data/loader.py): step s takes its images from
the permutation of (seed, epoch), each rank a contiguous slice of every global batch. For each
epoch (or the rest of one, when resuming) the pipeline is built over that epoch's files in
rank-major order, and `fn.readers.file` shards them with shard_id = rank, num_shards = world
size: shard r is then exactly rank r's slices, in step order. Each file's label carries its
data-set index and its flip bit, so attributes and flips travel with it.

Last batch: only full global batches are used in an epoch; the images left over (fewer than one
global batch) differ every epoch and are counted in the start-up line. Resume is exact, to the
step within the epoch. A file DALI cannot decode stops the run with an error naming it
(the PIL loader instead skips and counts such files).

With device "cpu" the pipeline runs on DALI's CPU operators (device_id=None): that is how the
tests exercise it on machines without a GPU.
"""
import numpy as np
import torch
from PIL import Image

from .datasets import DataError
from .loader import StepBatchSampler
from .preprocess import CELEBA_CROP, CELEBA_SIZE, SIGMA_PER_SHRINK

DALI_THREADS = 4
NO_BLUR_SIGMA = 0.01  # a 3-tap kernel of weights ~(0, 1, 0): the identity, for images not shrunk


def dali_unavailable_reason():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"NVIDIA DALI is not installed ({e}); pip install nvidia-dali-cuda130"
    return None


def _epoch_files(dataset, sampler, epoch, first_step, steps):
    """(files, labels) of steps first_step..first_step+steps-1 of `epoch`, rank-major."""
    order, flips = sampler.epoch_order(epoch)
    files, labels = [], []
    for rank in range(sampler.world_size):
        for position in range(first_step, first_step + steps):
            start = position * sampler.global_batch + rank * sampler.batch_size
            for index in order[start:start + sampler.batch_size]:
                files.append(dataset.paths[index])
                labels.append(2 * index + int(flips[index]))
    return files, labels


def _build_pipeline(files, labels, dataset, sampler, device, device_id):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dali_math

    size, channels = dataset.image_size, dataset.channels
    decoder_device, op_device = ("mixed", "gpu") if device == "cuda" else ("cpu", "cpu")

    @pipeline_def(batch_size=sampler.batch_size, num_threads=DALI_THREADS, device_id=device_id,
                  prefetch_queue_depth=2)
    def pipeline():
        encoded, label = fn.readers.file(files=files, labels=labels, shard_id=sampler.rank,
                                         num_shards=sampler.world_size, random_shuffle=False,
                                         pad_last_batch=True, name="reader")
        images = fn.decoders.image(encoded, device=decoder_device,
                                   output_type=types.GRAY if channels == 1 else types.RGB)
        if dataset.celeba:
            left, upper, right, _ = CELEBA_CROP
            side = right - left
            # crop_pos is the anchor as a fraction of the free space: 15/30, 40/70 for CelebA
            images = fn.crop(images, crop=(side, side), crop_pos_x=left / (CELEBA_SIZE[0] - side),
                             crop_pos_y=upper / (CELEBA_SIZE[1] - side), device=op_device)
            images = fn.gaussian_blur(images, sigma=SIGMA_PER_SHRINK * side / size, device=op_device)
        else:  # the centred square, low-passed only when shrinking (as the PIL path does)
            shape = fn.peek_image_shape(encoded)  # (H, W, C)
            height, width = shape[0], shape[1]
            side_int = dali_math.min(height, width)
            # integer anchors, as the PIL path takes them (a fractional crop_pos would round differently)
            anchor = fn.stack((height - side_int) // 2, (width - side_int) // 2)
            images = fn.slice(images, anchor, fn.stack(side_int, side_int), axis_names="HW", device=op_device)
            side = fn.cast(side_int, dtype=types.FLOAT)
            shrinking = fn.cast(side > size, dtype=types.FLOAT)
            sigma = shrinking * (SIGMA_PER_SHRINK / size) * side + (1.0 - shrinking) * NO_BLUR_SIGMA
            images = fn.gaussian_blur(images, sigma=sigma, device=op_device)
        images = fn.resize(images, size=(size, size), interp_type=types.INTERP_LINEAR, antialias=True,
                           device=op_device)
        images = fn.crop_mirror_normalize(images, mirror=label % 2, mean=[127.5], std=[127.5],
                                          output_layout="CHW", dtype=types.FLOAT, device=op_device)
        return images, label

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliLoader:
    """Iterates (images, attributes, unreadable=[]) for steps start..end-1, like the PIL loader."""

    def __init__(self, dataset, batch_size, rank, world_size, seed, start_step, end_step, flip=True,
                 device="cpu", device_id=None):
        reason = dali_unavailable_reason()
        if reason:
            raise DataError(f"--loader dali: {reason}")
        if dataset.in_memory:
            raise DataError("--loader dali decodes image files; the built-in faces are held in memory: "
                            "use --loader pil")
        self.dataset, self.device, self.device_id = dataset, device, device_id
        self.sampler = StepBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_step, end_step, flip)
        self.num_workers = DALI_THREADS
        self.unused_per_epoch = len(dataset) - self.sampler.steps_per_epoch * self.sampler.global_batch

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        sampler = self.sampler
        step = sampler.start_step
        while step < sampler.end_step:
            epoch, position = divmod(step, sampler.steps_per_epoch)
            steps = min(sampler.steps_per_epoch - position, sampler.end_step - step)
            files, labels = _epoch_files(self.dataset, sampler, epoch, position, steps)
            pipe = _build_pipeline(files, labels, self.dataset, sampler, self.device, self.device_id)
            for i in range(steps):
                try:
                    images, label = pipe.run()
                except RuntimeError as e:
                    # the failure may come from a prefetched batch: look at this one and the next two
                    start = (sampler.rank * steps + i) * sampler.batch_size
                    shard_end = (sampler.rank + 1) * steps * sampler.batch_size
                    raise DataError(self._explain(files[start:min(start + 3 * sampler.batch_size, shard_end)], e)) from None
                yield self._to_torch(images, label)
            step += steps
            del pipe

    def _to_torch(self, images, label):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        images = images.as_tensor()
        target = torch.empty(images.shape(), dtype=torch.float32,
                             device=torch.device("cuda", self.device_id) if self.device == "cuda" else "cpu")
        feed_ndarray(images, target)
        indices = torch.from_numpy(np.array(label.as_tensor()).reshape(-1).astype(np.int64)) // 2
        return target, self.dataset.attributes[indices], []

    def _explain(self, batch, error):
        for path in batch:
            try:
                with Image.open(path) as image:
                    image.load()
            except Exception as e:  # the file PIL cannot read either
                return (f"{path}: cannot be decoded ({type(e).__name__}: {e}); remove it, or train with "
                        "--loader pil, which skips unreadable images")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"DALI failed on a batch starting with {batch[0]}: {first_line}"
