"""Image preprocessing on the CPU: the authors' CelebA crop, low-pass and resize (dataset/celeba.py).

After the crop the image is low-passed with a Gaussian of sigma = sqrt(shrink) / 2 (0.76 for
CelebA's 148-pixel crop at 64 px) and resized with an order-3 spline, without anti-aliasing (the
blur is the anti-aliasing), then scaled to 0..255 and truncated, as the authors did with
scikit-image. An anti-aliased bilinear resize after the blur gives visibly softer images (0.66 to
0.80 of the Laplacian RMS), and the paper is about sharpness. Images that are enlarged (a folder's
small images) are not blurred.
"""
import functools
import math

import numpy as np
import torch
from scipy import ndimage
from skimage import transform

from . import augment

CELEBA_SIZE = (178, 218)  # (width, height) of img_align_celeba
CELEBA_CROP = (15, 40, 163, 188)  # (left, upper, right, lower): rows 40..188, columns 15..163


def lowpass_sigma(shrink):
    """The authors' low-pass before shrinking by `shrink` (> 1)."""
    return math.sqrt(shrink) / 2.0


@functools.lru_cache(maxsize=64)
def _resize_matrix(source, size):
    """(size, source): scikit-image's order-3 spline resize (mode reflect, no anti-aliasing) along
    one axis. It is separable, so the authors' 2-D resize is R @ X @ R.T per channel: two small
    matrix products instead of a spline fit of the whole image (a test compares the two)."""
    return transform.resize(np.eye(source), (size, source), order=3, mode="reflect", anti_aliasing=False, clip=False)


def lowpass_resize(array, size):
    """uint8 (S, S, C), or float in [0, 1] -> uint8 (size, size, C): the authors' blur and order-3 spline resize."""
    image = array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else array
    shrink = image.shape[0] / size
    if shrink > 1:  # scikit-image's gaussian: mode nearest, truncated at 4 sigma, channels apart
        sigma = lowpass_sigma(shrink)
        image = ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="nearest", truncate=4.0)
    # torch, not numpy, multiplies: a DataLoader worker runs torch on one thread, where numpy's BLAS
    # would start a thread per core in every worker
    resize = torch.from_numpy(_resize_matrix(image.shape[0], size))
    channels_first = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    resized = (resize @ channels_first @ resize.T).permute(1, 2, 0).numpy()
    resized = np.clip(resized, image.min(), image.max())  # scikit-image clips to the input's range
    return (resized * 255).astype(np.uint8)


def to_mode(image, channels):
    return image.convert("L" if channels == 1 else "RGB")


def preprocess(image, size, channels, celeba, augmentation=None):
    """PIL image -> uint8 array (size, size, channels), cropped, low-passed and resized; with an
    augmentation (vaegan/data/augment.py), the authors' augmentation first, on the whole image."""
    image = to_mode(image, channels)
    if celeba and image.size != CELEBA_SIZE:
        raise ValueError(f"is {image.size[0]}x{image.size[1]}, not the {CELEBA_SIZE[0]}x{CELEBA_SIZE[1]} "
                         "of aligned CelebA")
    array = np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], channels)
    if augmentation is not None:
        array = augment.apply(array / 255.0, augmentation)
    height, width = array.shape[:2]
    if celeba:
        left, upper, right, lower = CELEBA_CROP
    else:  # the centred square
        side = min(width, height)
        left, upper = (width - side) // 2, (height - side) // 2
        right, lower = left + side, upper + side
    return lowpass_resize(array[upper:lower, left:right], size)
