"""NVIDIA DALI loader: JPEG/PNG decoding (nvJPEG on the GPU), crop, low-pass, resize and flip.

The order is the one the PIL loader uses (vaegan/data/loader.py): the same StepBatchSampler
says which files rank r reads at step s. The pipeline is built once per run and fed by an
external source that follows the sampler: each batch's encoded files (read on the host) and
labels carrying each file's data-set index and flip bit, so attributes and flips travel with it.
Nothing is rebuilt at an epoch boundary (nvJPEG's state and DALI's memory pools live as long as
the loader).

Last batch: only full global batches are used in an epoch; the images left over (fewer than one
global batch) differ every epoch and are counted in the start-up line. Resume is exact, to the
step within the epoch. A file DALI cannot decode stops the run with an error naming it
(the PIL loader instead skips and counts such files).

On CUDA the batch is copied into PyTorch memory on PyTorch's current stream, so the copy is
ordered with the training step's kernels (as DALI's own PyTorch iterator does). With device
"cpu" the pipeline runs on DALI's CPU operators (device_id=None): that is how the tests
exercise it on machines without a GPU.
"""
import collections
import io

import numpy as np
import torch
from PIL import Image

from . import augment
from .datasets import DataError
from .loader import StepBatchSampler
from .preprocess import CELEBA_CROP, CELEBA_SIZE, lowpass_sigma

DALI_THREADS = 4
PREFETCH = 2
NO_BLUR_SIGMA = 0.01  # a 3-tap kernel of weights ~(0, 1, 0): the identity, for images not shrunk


def dali_unavailable_reason():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"NVIDIA DALI is not installed ({e}); pip install nvidia-dali-cuda130"
    return None


class _EncodedBatches:
    """The pipeline's input: for each step of the sampler, this rank's files read as bytes, and
    labels 2 * index + flip. Remembers the files of the batches in flight, to name a bad one."""

    def __init__(self, dataset, sampler):
        self.dataset, self.sampler = dataset, sampler
        self.in_flight = collections.deque(maxlen=PREFETCH + 2)

    def __iter__(self):
        for batch in self.sampler:
            paths = [self.dataset.paths[index] for index, *_ in batch]
            self.in_flight.append(paths)
            encoded = [np.fromfile(path, dtype=np.uint8) for path in paths]
            labels = np.array([2 * index + int(flip) for index, flip, *_ in batch], dtype=np.int32)
            if not self.dataset.augment:
                yield encoded, labels
                continue
            drawn = [augment.draw(*place) for _, _, place in batch]
            matrices = [augment.pixel_span_matrix(a, self._shape(data)) for a, data in zip(drawn, encoded)]
            yield (encoded, labels, matrices, *([np.float32(getattr(a, name)) for a in drawn]
                                                for name in augmentation_inputs(self.dataset.channels)))

    def _shape(self, encoded):
        """(height, width): CelebA's, or read from the header of the bytes already in hand."""
        if not self.dataset.celeba:
            try:
                with Image.open(io.BytesIO(encoded)) as image:
                    return image.size[1], image.size[0]
            except Exception:  # DALI's decoder names the bad file when it meets it
                pass
        return CELEBA_SIZE[1], CELEBA_SIZE[0]


def augmentation_inputs(channels):
    """The drawn values the pipeline takes besides the warp (grey images have no hue)."""
    return ("gamma", "contrast", "hue") if channels == 3 else ("gamma", "contrast")




def _authors_colour(images, gamma, contrast, channels, hue=None):
    """vaegan/data/augment.py's colour changes in DALI arithmetic, on float images in [0, 1]: a
    gamma, then a power of HSV's saturation and value and a hue shift, written as the
    HSV -> RGB formula channel = V - V * S * clamp(min(k, 4 - k), 0, 1), k = (n + 6 * hue) mod 6
    with n = 5, 3, 1 for red, green, blue (exact, with no table of sextants)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dali_math

    images = dali_math.pow(images, gamma)
    if channels == 1:
        return dali_math.pow(images, contrast)
    red, green, blue = images[:, :, 0:1], images[:, :, 1:2], images[:, :, 2:3]
    value = fn.reductions.max(images, axis_names="C", keep_dims=True)
    chroma = value - fn.reductions.min(images, axis_names="C", keep_dims=True)
    safe_chroma = dali_math.max(chroma, 1e-12)
    red_max = fn.cast(red >= value, dtype=types.FLOAT)
    green_max = fn.cast(green >= value, dtype=types.FLOAT) * (1.0 - red_max)
    blue_max = 1.0 - red_max - green_max
    hue6 = (red_max * (green - blue) / safe_chroma + green_max * (2.0 + (blue - red) / safe_chroma)
            + blue_max * (4.0 + (red - green) / safe_chroma) + 6.0 * hue)
    saturation = dali_math.pow(chroma / dali_math.max(value, 1e-12), contrast)
    value = dali_math.pow(value, contrast)

    def channel(n):
        k = n + hue6
        k = k - 6.0 * dali_math.floor(k / 6.0)
        return value - value * saturation * dali_math.clamp(dali_math.min(k, 4.0 - k), 0.0, 1.0)
    return fn.cat(channel(5.0), channel(3.0), channel(1.0), axis=2)


def _build_pipeline(source, dataset, batch_size, device, device_id):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dali_math

    size, channels = dataset.image_size, dataset.channels
    decoder_device, op_device = ("mixed", "gpu") if device == "cuda" else ("cpu", "cpu")

    @pipeline_def(batch_size=batch_size, num_threads=DALI_THREADS, device_id=device_id,
                  prefetch_queue_depth=PREFETCH)
    def pipeline():
        if dataset.augment:
            names = augmentation_inputs(channels)
            encoded, label, matrix, *drawn = fn.external_source(
                source=source, num_outputs=3 + len(names), batch=True,
                dtype=[types.UINT8, types.INT32] + [types.FLOAT] * (1 + len(names)))
            drawn = dict(zip(names, drawn))
        else:
            encoded, label = fn.external_source(source=source, num_outputs=2, batch=True,
                                                dtype=[types.UINT8, types.INT32])
        images = fn.decoders.image(encoded, device=decoder_device,
                                   output_type=types.GRAY if channels == 1 else types.RGB)
        if dataset.augment:  # the authors' augmentation, on the whole image (vaegan/data/augment.py)
            # DALI's warp interpolates linearly (scikit-image's order-3 spline in the PIL loader; the
            # blur and the resize that follow leave less than a grey level of difference: a test)
            images = fn.warp_affine(images, matrix=matrix, inverse_map=True, interp_type=types.INTERP_LINEAR,
                                    dtype=types.FLOAT, device=op_device)
            images = _authors_colour(dali_math.clamp(images / 255.0, 0.0, 1.0), channels=channels, **drawn)
            images = images * 255.0
        if dataset.celeba:
            left, upper, right, _ = CELEBA_CROP
            side = right - left
            # crop_pos is the anchor as a fraction of the free space: 15/30, 40/70 for CelebA
            images = fn.crop(images, crop=(side, side), crop_pos_x=left / (CELEBA_SIZE[0] - side),
                             crop_pos_y=upper / (CELEBA_SIZE[1] - side), device=op_device)
            images = fn.gaussian_blur(images, sigma=lowpass_sigma(side / size), device=op_device)
        else:  # the centred square, low-passed only when shrinking (as the PIL path does)
            shape = fn.peek_image_shape(encoded)  # (H, W, C)
            height, width = shape[0], shape[1]
            side_int = dali_math.min(height, width)
            # integer anchors, as the PIL path takes them (a fractional crop_pos would round differently)
            anchor = fn.stack((height - side_int) // 2, (width - side_int) // 2)
            images = fn.slice(images, anchor, fn.stack(side_int, side_int), axis_names="HW", device=op_device)
            side = fn.cast(side_int, dtype=types.FLOAT)
            shrinking = fn.cast(side > size, dtype=types.FLOAT)
            sigma = shrinking * dali_math.sqrt(side / size) / 2.0 + (1.0 - shrinking) * NO_BLUR_SIGMA
            images = fn.gaussian_blur(images, sigma=sigma, device=op_device)
        # the authors' order-3 resize without anti-aliasing (the blur is the anti-aliasing); DALI's cubic
        # is a cubic convolution, not scikit-image's spline: a test holds the two together
        images = fn.resize(images, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=False,
                           device=op_device)
        if dataset.augment:  # float from the augmentation on: truncated to grey levels, as the PIL loader does
            images = dali_math.floor(dali_math.clamp(images, 0.0, 255.0))
        images = fn.crop_mirror_normalize(images, mirror=label % 2, mean=[127.5], std=[127.5],
                                          output_layout="CHW", dtype=types.FLOAT, device=op_device)
        return images, label

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliLoader:
    """Iterates (images, attributes, unreadable=[]) for steps start..end-1, like the PIL loader.

    The pipeline is built here, once: a loader that cannot be built fails at construction (so
    --loader auto can fall back to PIL before training starts). Iterate it once."""

    def __init__(self, dataset, batch_size, rank, world_size, seed, start_step, end_step, flip=True,
                 device="cpu", device_id=None):
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
        self.source = _EncodedBatches(dataset, self.sampler)
        self.pipe = _build_pipeline(self.source, dataset, batch_size, device, device_id)
        self.target_device = torch.device("cuda", device_id) if device == "cuda" else torch.device("cpu")

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for _ in range(len(self.sampler)):
            try:
                images, label = self.pipe.run()
            except RuntimeError as e:
                # the failure may come from a prefetched batch: look at every batch in flight
                raise DataError(self._explain([p for paths in self.source.in_flight for p in paths], e)) from None
            yield self._to_torch(images, label)

    def _to_torch(self, images, label):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        images = images.as_tensor()
        target = torch.empty(images.shape(), dtype=torch.float32, device=self.target_device)
        # on CUDA, DALI's copy is queued on PyTorch's current stream: ordered with the step's kernels
        stream = torch.cuda.current_stream(self.target_device) if self.device == "cuda" else None
        feed_ndarray(images, target, cuda_stream=stream)
        indices = torch.from_numpy(np.array(label.as_tensor()).reshape(-1).astype(np.int64)) // 2
        attributes = self.dataset.attributes[indices]
        if self.device == "cuda":  # pinned, so that the loop's non_blocking copy does not wait
            attributes = attributes.pin_memory()
        return target, attributes, []

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
