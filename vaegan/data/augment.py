"""The authors' augmentation (dataset/augment.py, dataset/celeba.py), applied before the crop.

Each training image gets a random similarity transform (translation sigma 2 px, scale sigma 0.01,
rotation sigma 0.01 rad; order-3 spline, border pixels repeated), a gamma and a contrast (a power
of HSV's saturation and value), each exp(N(sigma^2, sigma) / ln 2) with sigma 0.05, and a hue shift
(sigma 0.01 of the hue circle). The authors drew 600,000 such images once; here each is drawn when
it is loaded, from (seed, step, slot in the global batch): the same on any number of workers or
processes, and again on resume. The draws are counter-based (Philox, kernels/philox.py, in a stream
of their own: each step's key comes from the run's seed and the step, and slot s takes the normals
at counters 7s .. 7s + 6 under it), so a whole batch is drawn in a few tensor operations, on any
device, with no per-image work.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from skimage import color, transform

from kernels import philox

SIGMAS = {"translation": 2.0, "scale": 0.01, "rotation": 0.01, "gamma": 0.05, "contrast": 0.05, "hue": 0.01}


@dataclass(frozen=True)
class Augmentation:
    translation: tuple  # (rows, columns) in pixels of the full image, as the authors' warp takes it
    scale: float
    rotation: float     # radians
    gamma: float
    contrast: float
    hue: float          # a fraction of the hue circle


STREAM = 0x2545F491  # added to the run's seed: the augmentation's Philox keys are not the training noise's
NORMALS = 7             # translation (2), scale, rotation, gamma, contrast, hue


def standard_normals(seed, step, slots):
    """float64 (len(slots), 7) standard normals of (seed, step, slot) for an int64 tensor of slots, on its
    device: Box-Muller on two Philox words taken as exact float64 uniforms."""
    key = int(philox.philox_words(philox.normalise_seed(seed + STREAM), torch.tensor([step]))[0]) % philox.SEED_LIMIT
    counters = slots.reshape(-1, 1).to(torch.int64) * NORMALS + torch.arange(NORMALS, device=slots.device)
    w1, w2 = philox.philox_words(key, counters)
    u1 = (w1.double() + 1.0) / 2.0 ** 32  # in (0, 1]: the logarithm is finite
    u2 = w2.double() / 2.0 ** 32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def draw_fields(seed, step, slots):
    """{field: float64 tensor} of the slots' augmentations (translation (B, 2) in (rows, columns), the
    others (B,)), with the authors' distributions: gamma and contrast exp(N(sigma^2, sigma) / ln 2)."""
    n = standard_normals(seed, step, slots)

    def log2_normal(column, sigma):
        return torch.exp((sigma ** 2 + sigma * column) / math.log(2))
    return {"translation": SIGMAS["translation"] * n[:, 0:2], "scale": 1.0 + SIGMAS["scale"] * n[:, 2],
            "rotation": SIGMAS["rotation"] * n[:, 3], "gamma": log2_normal(n[:, 4], SIGMAS["gamma"]),
            "contrast": log2_normal(n[:, 5], SIGMAS["contrast"]), "hue": SIGMAS["hue"] * n[:, 6]}


def draw(seed, step, slot):
    """The augmentation of slot `slot` of step `step`'s global batch (draw_fields of that one slot)."""
    fields = {name: value[0].tolist() for name, value in draw_fields(seed, step, torch.tensor([slot])).items()}
    return Augmentation(tuple(fields["translation"]), fields["scale"], fields["rotation"], fields["gamma"],
                        fields["contrast"], fields["hue"])


def inverse_map(a, shape):
    """The warp as the authors give it to scikit-image's warp: output (x, y) -> input (x, y), pixel
    centres at integers. Like theirs, it takes the centre and the translation in (rows, columns)."""
    centre = np.array(shape[:2]) / 2.0
    return (transform.SimilarityTransform(translation=-centre)
            + transform.SimilarityTransform(scale=a.scale, rotation=a.rotation)
            + transform.SimilarityTransform(translation=centre + np.array(a.translation)))


def apply(image, a):
    """float (H, W, C) in [0, 1] -> the augmented float image, C = 3 (RGB) or 1 (grey: no hue)."""
    image = transform.warp(image, inverse_map(a, image.shape), order=3, mode="edge")
    return colour(np.clip(image, 0.0, 1.0), a)


def colour(image, a):
    """float (H, W, C) in [0, 1]: the gamma, then the power of saturation and value and the hue shift."""
    image = image ** a.gamma
    if image.shape[2] == 1:  # grey: value only
        return image ** a.contrast
    hsv = color.rgb2hsv(image)
    hsv[..., 1:] **= a.contrast
    hsv[..., 0] = (hsv[..., 0] + a.hue) % 1.0
    return np.clip(color.hsv2rgb(hsv), 0.0, 1.0)
