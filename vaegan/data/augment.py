"""The authors' augmentation (dataset/augment.py, dataset/celeba.py), applied before the crop.

Each training image gets a random similarity transform (translation sigma 2 px, scale sigma 0.01,
rotation sigma 0.01 rad; order-3 spline, border pixels repeated), a gamma and a contrast (a power
of HSV's saturation and value), each exp(N(sigma^2, sigma) / ln 2) with sigma 0.05, and a hue shift
(sigma 0.01 of the hue circle). The authors drew 600,000 such images once; here each is drawn when
it is loaded, from (seed, step, slot in the global batch): the same on any number of workers or
processes, and again on resume.
"""
import math
from dataclasses import dataclass

import numpy as np
from skimage import color, transform

SIGMAS = {"translation": 2.0, "scale": 0.01, "rotation": 0.01, "gamma": 0.05, "contrast": 0.05, "hue": 0.01}


@dataclass(frozen=True)
class Augmentation:
    translation: tuple  # (rows, columns) in pixels of the full image, as the authors' warp takes it
    scale: float
    rotation: float     # radians
    gamma: float
    contrast: float
    hue: float          # a fraction of the hue circle


def log2_normal(rng, sigma):
    return math.exp(rng.normal(sigma ** 2, sigma) / math.log(2))


def draw(seed, step, slot):
    """The augmentation of slot `slot` of step `step`'s global batch, with the authors' distributions."""
    rng = np.random.default_rng([seed, step, slot])
    translation = tuple(rng.normal(0.0, SIGMAS["translation"], size=2))
    return Augmentation(translation, rng.normal(1.0, SIGMAS["scale"]), rng.normal(0.0, SIGMAS["rotation"]),
                        log2_normal(rng, SIGMAS["gamma"]), log2_normal(rng, SIGMAS["contrast"]),
                        rng.normal(0.0, SIGMAS["hue"]))


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
