"""NVIDIA DALI loader: DALI decodes (nvJPEG on the GPU), the shared batched preprocessing does the rest.

The order is the one the PIL loader uses (vaegan/data/loader.py): the same StepBatchSampler says
which files rank r reads at step s. The pipeline is built once per run. Its input is a parallel
external source: DALI's Python worker processes call _Samples for each sample of each iteration,
and it takes slot j of iteration i from the sampler's batch at step start + i (so a resumed run
continues exactly), reads that file's bytes, and returns them with the image's data-set index and its
flip bit. Nothing is done per image on the thread that launches the training step: it receives the
decoded batch and these values as arrays, and draws the step's augmentations from (seed, step,
slots) in a few tensor operations on the device (loader.DeviceBatch, as every loader draws them).

DALI only decodes: CelebA's whole 178x218 image; a folder's centred square at datasets.decoded_side
(the side ImageFiles.decode gives the PIL loader and the cache), cut, low-passed and resized in DALI
because a folder's images may differ in size and a batch must be one size. The uint8 (B, H, W, 3)
batch then goes through device_preprocess.preprocess_batch on the training device, the function
the PIL loader and the decoded cache use: the authors' augmentation, crop, low-pass, resize, grey
conversion and flip are one implementation for every loader.

Last batch: only full global batches are used in an epoch; the images left over (fewer than one
global batch) differ every epoch and are counted in the start-up line. A file DALI cannot decode,
or a CelebA file of another size, stops the run with an error naming it (the PIL loader instead
skips and counts such files).

On CUDA the decoded batch and its labels (index, flip), both on the GPU (the labels copied there
inside the pipeline), are copied into PyTorch memory on PyTorch's current stream, so the copy is
ordered with the preprocessing and the training step's kernels (as DALI's own PyTorch iterator does)
and nothing goes from the host to the device per batch on PyTorch's side. With device "cpu" the
pipeline runs on DALI's CPU operators (device_id=None): that is how the tests exercise it on machines
without a GPU.
"""
import os

import numpy as np
import torch
from PIL import Image

from .datasets import DataError, decoded_side
from .loader import DeviceBatch, StepBatchSampler
from .preprocess import CELEBA_SIZE

DALI_THREADS = 4
PY_WORKERS = 4  # DALI's Python worker processes (file reads), at most one per core
PREFETCH = 2
NO_BLUR_SIGMA = 0.01  # a 3-tap kernel of weights ~(0, 1, 0): the identity, for squares not shrunk
DRAWN = 7  # translation (rows, columns), scale, rotation, gamma, contrast, hue


def dali_unavailable_reason():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"NVIDIA DALI is not installed ({e}); pip install nvidia-dali-cuda130"
    return None


class _Samples:
    """The parallel external source's callback, run in DALI's Python workers (picklable: the file
    paths, the sampler and a flag). Sample j of iteration i: slot j of the sampler's batch at step
    start + i, as (encoded bytes, int64 [index, flip]). The epoch's order and
    the step's batch are cached in each worker (a value of the arguments only, so any worker may
    serve any sample)."""

    def __init__(self, paths, sampler):
        self.paths, self.sampler = paths, sampler
        self._epoch = self._step = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_epoch=None, _step=None)
        return state

    def batch(self, step):
        if self._step is None or self._step[0] != step:
            epoch = step // self.sampler.steps_per_epoch
            if self._epoch is None or self._epoch[0] != epoch:
                self._epoch = (epoch, self.sampler.epoch_order(epoch))
            self._step = (step, self.sampler.batch_at(step, self._epoch[1]))
        return self._step[1]

    def __call__(self, info):
        step = self.sampler.start_step + info.iteration
        if step >= self.sampler.end_step:
            raise StopIteration
        index, flip, _ = self.batch(step)[info.idx_in_batch]
        return np.fromfile(self.paths[index], dtype=np.uint8), np.array([index, int(flip)], dtype=np.int64)


def _folder_square(images, encoded, side):
    """A folder's centred square at `side`, as ImageFiles.decode cuts it (integer anchors) and, where its
    size differs, low-passes it when shrinking and resizes it (DALI's cubic convolution: the PIL path's
    order-3 spline to within a few grey levels, a test), clipped to its range and truncated to uint8."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dali_math

    shape = fn.peek_image_shape(encoded)  # (H, W, C)
    height, width = shape[0], shape[1]
    square = dali_math.min(height, width)
    anchor = fn.stack((height - square) // 2, (width - square) // 2)
    images = fn.slice(images, anchor, fn.stack(square, square), axis_names="HW")
    source = fn.cast(square, dtype=types.FLOAT)
    shrinking = fn.cast(source > side, dtype=types.FLOAT)
    sigma = shrinking * dali_math.sqrt(source / side) / 2.0 + (1.0 - shrinking) * NO_BLUR_SIGMA
    images = fn.gaussian_blur(images, sigma=sigma, dtype=types.FLOAT)
    low, high = fn.reductions.min(images), fn.reductions.max(images)
    # a square already at `side` is resized onto itself: cubic convolution's weights at whole pixels
    # are (0, 1, 0, 0), so it is unchanged, as decode leaves it
    images = fn.resize(images, size=(side, side), interp_type=types.INTERP_CUBIC, antialias=False,
                       dtype=types.FLOAT)
    images = dali_math.floor(dali_math.max(dali_math.min(images, high), low))
    return fn.cast(images, dtype=types.UINT8)


def _build_pipeline(source, dataset, batch_size, device, device_id, py_start_method):
    from nvidia.dali import fn, pipeline_def, types

    decoder_device = "mixed" if device == "cuda" else "cpu"
    @pipeline_def(batch_size=batch_size, num_threads=DALI_THREADS, device_id=device_id,
                  prefetch_queue_depth=PREFETCH, py_num_workers=min(PY_WORKERS, os.cpu_count() or 1),
                  py_start_method=py_start_method)
    def pipeline():
        encoded, labels = fn.external_source(source=source, num_outputs=2, batch=False, parallel=True,
                                             dtype=[types.UINT8, types.INT64])
        # RGB always: preprocess_batch converts to grey with PIL's formula, as the PIL loader does
        images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
        if not dataset.celeba:
            images = _folder_square(images, encoded, decoded_side(dataset.image_size, dataset.augment))
        # on the GPU the labels go to the device inside the pipeline, with DALI's own asynchronous copy
        return images, labels.gpu() if device == "cuda" else labels

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliLoader:
    """Iterates (images, attributes, unreadable=[]) for steps start..end-1, like the PIL loader.

    The pipeline is built here, once: a loader that cannot be built fails at construction (so
    --loader auto can fall back to PIL before training starts). Iterate it once: the pipeline and
    its worker processes are shut down when the iteration ends (or fails, or is closed), or by close().
    py_start_method: how DALI starts its Python workers; by default "spawn" on CUDA (forking a process
    that holds a CUDA context is unsupported) and "fork" on the CPU."""

    def __init__(self, dataset, batch_size, rank, world_size, seed, start_step, end_step, flip=True,
                 device="cpu", device_id=None, py_start_method=None):
        reason = dali_unavailable_reason()
        if reason:
            raise DataError(f"--loader dali: {reason}")
        if dataset.in_memory:
            raise DataError("--loader dali decodes image files; the built-in faces are held in memory: "
                            "use --loader pil")
        if device == "cuda" and device_id is None:
            raise ValueError("DaliLoader on CUDA needs the device index (device_id)")
        self.dataset, self.device, self.device_id = dataset, device, device_id
        self.sampler = StepBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_step, end_step, flip)
        self.num_workers = DALI_THREADS
        self.unused_per_epoch = len(dataset) - self.sampler.steps_per_epoch * self.sampler.global_batch
        self.source = _Samples(list(dataset.paths), self.sampler)
        start_method = py_start_method or ("spawn" if device == "cuda" else "fork")
        self.pipe = _build_pipeline(self.source, dataset, batch_size, device, device_id, start_method)
        self.target_device = torch.device("cuda", device_id) if device == "cuda" else torch.device("cpu")
        self.finish = DeviceBatch(dataset, self.target_device)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        try:
            for i in range(len(self.sampler)):
                try:
                    outputs = self.pipe.run()
                except Exception as e:
                    # the failure may come from a prefetched batch: look at every batch in flight
                    raise DataError(self._explain(self._paths_in_flight(i), e)) from None
                yield self._to_torch(i, *outputs)
        finally:
            self.close()

    def close(self):
        """Stop the pipeline and its Python workers (idempotent)."""
        pipe, self.pipe = getattr(self, "pipe", None), None
        if pipe is None:
            return
        pool = getattr(pipe, "_py_pool", None)
        pipe._shutdown()
        if pool is not None:
            pool.close()

    def _to_torch(self, i, images, labels):
        if self.dataset.celeba and not images.is_dense_tensor():
            self._wrong_size(i, images)
        images, labels = self._fetch(images.as_tensor(), torch.uint8), self._fetch(labels.as_tensor(), torch.int64)
        return self._batch(i, images, labels)

    def _fetch(self, dense, dtype):
        """A DALI tensor (on the device on CUDA) as a torch tensor on the training device. On CUDA, DALI's
        copy is queued on PyTorch's current stream: ordered with the step's kernels, nothing waits."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        target = torch.empty(dense.shape(), dtype=dtype, device=self.target_device)
        stream = torch.cuda.current_stream(self.target_device) if self.device == "cuda" else None
        feed_ndarray(dense, target, cuda_stream=stream)
        return target

    def _batch(self, i, images, labels):
        """images uint8 (B, H, W, 3) and labels int64 (B, 2) (index, flip), on the training device ->
        (float batch, attributes, unreadable=[]), drawn and preprocessed as every loader does."""
        sampler, first = self.sampler, self.sampler.rank * self.sampler.batch_size
        places = [(sampler.seed, sampler.start_step + i, first + j) for j in range(images.shape[0])]
        return (*self.finish(images, labels, places), [])

    def _wrong_size(self, i, images):
        want = (CELEBA_SIZE[1], CELEBA_SIZE[0])
        for j, (index, _, _) in enumerate(self.sampler.batch_at(self.sampler.start_step + i)):
            shape = tuple(images[j].shape())[:2]
            if shape != want:
                raise DataError(f"{self.dataset.paths[index]}: is {shape[1]}x{shape[0]}, not the "
                                f"{want[1]}x{want[0]} of aligned CelebA; remove it, or train with --loader pil, "
                                "which skips such images")

    def _paths_in_flight(self, i):
        first = self.sampler.start_step + i
        steps = range(first, min(self.sampler.end_step, first + PREFETCH + 1))
        return [self.dataset.paths[index] for step in steps for index, _, _ in self.sampler.batch_at(step)]

    def _explain(self, paths, error):
        for path in paths:
            try:
                with Image.open(path) as image:
                    image.load()
            except Exception as e:  # the file PIL cannot read either
                return (f"{path}: cannot be decoded ({type(e).__name__}: {e}); remove it, or train with "
                        "--loader pil, which skips unreadable images")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"DALI failed on a batch starting with {paths[0]}: {first_line}"
