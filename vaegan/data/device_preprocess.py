"""The per-image CPU path (preprocess.py, augment.py) as batched torch operations on the input's device.

Same maths, same order: the authors' augmentation on the whole image (similarity warp with
scikit-image's order-3 interpolation, border pixels repeated, clipped to the input's range; then
gamma, HSV saturation and value powers, hue shift), the crop (CelebA's, or the centred square), the
Gaussian low-pass and the order-3 spline resize as matrix products, truncation to 0..255, and the
horizontal flip last. Nothing is copied from the host per batch: the augmentation's parameters are
drawn on the device from (seed, step, first slot), and the low-pass and resize matrices are built and
copied to the device once per shape. Images are uint8 (B, H, W, C), all of one size, already decoded: CelebA's
178x218 images, or any other size, whose centred square is taken. The warp sees the whole image, as
the CPU path's does: a folder's images cut to squares beforehand differ from it at the borders.

scikit-image's warp, for a SimilarityTransform and order 3, does not call scipy's spline
interpolation: it takes its own bicubic path, Keys' cubic convolution with a = -0.5 (Catmull-Rom),
on the 4x4 neighbourhood of floor(coordinate). torch's grid_sample bicubic uses a = -0.75, hence
the gather here.

In float32 the matrix products follow torch's float32 matmul precision: with TF32 allowed (not
torch's default) their 10-bit mantissas would no longer give the CPU path's grey levels.
"""
import functools

import numpy as np
import torch

from . import augment
from .preprocess import CELEBA_CROP, CELEBA_SIZE, _resize_matrix, lowpass_sigma

KEYS_A = -0.5
AUGMENTATION_FIELDS = ("translation", "scale", "rotation", "gamma", "contrast", "hue")


def draw_batch(places, device=None):
    """[(seed, step, slot), ...] -> {field: float64 tensor on `device`}: augment.draw_fields of each
    (seed, step) group's slots. A loader's batch (one group, consecutive slots) is drawn on the device
    from its first slot alone: nothing is copied from the host."""
    seed, step, first = places[0]
    if all(place == (seed, step, first + j) for j, place in enumerate(places)):
        return augment.draw_fields(seed, step, torch.arange(first, first + len(places), device=device))
    groups = {}
    for i, (seed, step, slot) in enumerate(places):
        groups.setdefault((seed, step), []).append((i, slot))
    fields = {name: torch.empty((len(places), 2) if name == "translation" else (len(places),), dtype=torch.float64,
                                device=device) for name in AUGMENTATION_FIELDS}
    for (seed, step), members in groups.items():
        rows = torch.tensor([i for i, _ in members], device=device)
        drawn = augment.draw_fields(seed, step, torch.tensor([slot for _, slot in members], device=device))
        for name in AUGMENTATION_FIELDS:
            fields[name][rows] = drawn[name]
    return fields


def inverse_maps(augmentations, shape):
    """(B, 2, 3) float64: augment.inverse_map for each image, output (x, y) -> input (x, y). Like it,
    the centre and the translation are taken in (rows, columns) and used as (x, y)."""
    scale, rotation = augmentations["scale"], augmentations["rotation"]
    cos, sin = scale * torch.cos(rotation), scale * torch.sin(rotation)
    cx, cy = shape[0] / 2.0, shape[1] / 2.0
    tx, ty = augmentations["translation"].unbind(1)
    return torch.stack([torch.stack([cos, -sin, cx + tx - cos * cx + sin * cy], 1),
                        torch.stack([sin, cos, cy + ty - sin * cx - cos * cy], 1)], 1)


def keys_weights(t, a=KEYS_A):
    """The cubic convolution weights of the taps at -1, 0, 1, 2 for a fraction t in [0, 1)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return far(1 + t), near(t), near(1 - t), far(2 - t)


def warp(images, matrices, box=None, a=KEYS_A):
    """float (B, C, H, W), (B, 2, 3) inverse maps -> the warped images, as scikit-image's
    warp(order=3, mode="edge"), clipped to each input's range as it clips. box (left, upper, right,
    lower): compute only that part of the output (the crop that follows)."""
    batch, channels, height, width = images.shape
    left, upper, right, lower = box or (0, 0, width, height)
    dtype, device = images.dtype, images.device
    rows, columns = torch.meshgrid(torch.arange(upper, lower, device=device, dtype=torch.float64),
                                   torch.arange(left, right, device=device, dtype=torch.float64), indexing="ij")
    grid = torch.stack([columns, rows, torch.ones_like(rows)]).reshape(3, -1)  # (x, y, 1)
    source = (matrices @ grid).to(dtype)  # (B, 2, N): input x, y
    x0, y0 = source[:, 0].floor(), source[:, 1].floor()
    wx, wy = keys_weights(source[:, 0] - x0, a), keys_weights(source[:, 1] - y0, a)
    x0, y0 = x0.long(), y0.long()
    tap_columns = [(x0 + (j - 1)).clamp_(0, width - 1) for j in range(4)]
    tap_rows = [(y0 + (i - 1)).clamp_(0, height - 1) * width for i in range(4)]
    flat = images.reshape(batch, channels, height * width)
    out = images.new_zeros(batch, channels, grid.shape[1])
    for row, row_weight in zip(tap_rows, wy):
        for column, column_weight in zip(tap_columns, wx):
            taps = flat.gather(2, (row + column)[:, None].expand(-1, channels, -1))
            out += (row_weight * column_weight)[:, None] * taps
    low, high = flat.amin(dim=(1, 2)), flat.amax(dim=(1, 2))
    out = torch.maximum(torch.minimum(out, high[:, None, None]), low[:, None, None])
    return out.reshape(batch, channels, lower - upper, right - left)


def rgb2hsv(rgb):
    """(B, 3, H, W) in [0, 1] -> HSV, with scikit-image's formulas and ties (blue over green over red)."""
    red, green, blue = rgb.unbind(1)
    value = rgb.amax(1)
    delta = value - rgb.amin(1)
    grey = delta == 0
    safe_delta = torch.where(grey, torch.ones_like(delta), delta)
    saturation = torch.where(grey, torch.zeros_like(delta), delta / torch.where(grey, torch.ones_like(value), value))
    hue = (green - blue) / safe_delta
    hue = torch.where(green == value, 2.0 + (blue - red) / safe_delta, hue)
    hue = torch.where(blue == value, 4.0 + (red - green) / safe_delta, hue)
    hue = torch.where(grey, torch.zeros_like(hue), torch.remainder(hue / 6.0, 1.0))
    return torch.stack([hue, saturation, value], 1)


def hsv2rgb(hsv):
    """(B, 3, H, W) HSV -> RGB, with scikit-image's sextant formulas."""
    hue, saturation, value = hsv.unbind(1)
    sextant = torch.floor(hue * 6)
    f = hue * 6 - sextant
    p = value * (1 - saturation)
    q = value * (1 - f * saturation)
    t = value * (1 - (1 - f) * saturation)
    choices = torch.stack([torch.stack(c, 1) for c in ((value, t, p), (q, value, p), (p, value, t),
                                                        (p, q, value), (t, p, value), (value, p, q))])
    index = torch.remainder(sextant.long(), 6)[None, :, None].expand(1, -1, 3, -1, -1)
    return choices.gather(0, index)[0]


def colour(images, augmentations):
    """float (B, C, H, W) in [0, 1]: augment.colour for each image."""
    def per_image(name):
        return augmentations[name].to(device=images.device, dtype=images.dtype)[:, None, None, None]
    images = images ** per_image("gamma")
    contrast = per_image("contrast")
    if images.shape[1] == 1:  # grey: value only
        return images ** contrast
    hsv = rgb2hsv(images)
    hue = torch.remainder(hsv[:, :1] + per_image("hue"), 1.0)
    return hsv2rgb(torch.cat([hue, hsv[:, 1:] ** contrast], 1)).clamp(0.0, 1.0)


@functools.lru_cache(maxsize=16)
def _lowpass_matrix(source, sigma, truncate=4.0):
    """(source, source): scipy's gaussian_filter1d (mode nearest) along one axis, as a matrix."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / sigma ** 2 * offsets ** 2)
    kernel /= kernel.sum()
    matrix = np.zeros((source, source))
    rows = np.arange(source)
    for offset, weight in zip(offsets, kernel):
        np.add.at(matrix, (rows, np.clip(rows + offset, 0, source - 1)), weight)
    return matrix


@functools.lru_cache(maxsize=16)
def lowpass_resize_matrices(source, size, device, dtype):
    """(blur (source, source) or None, resize (size, source)) on `device`: built and copied there once
    per shape, so that a batch copies nothing from the host."""
    blur = None
    if source > size:
        blur = torch.from_numpy(_lowpass_matrix(source, lowpass_sigma(source / size))).to(device, dtype)
    return blur, torch.from_numpy(_resize_matrix(source, size)).to(device, dtype)


def lowpass_resize(images, size):
    """float (B, C, S, S) in [0, 1] -> float (B, C, size, size) on the 0..255 grid (truncated), as
    preprocess.lowpass_resize: blur when shrinking, order-3 spline resize, clip to the range."""
    blur, resize = lowpass_resize_matrices(images.shape[-1], size, images.device, images.dtype)
    if blur is not None:
        images = blur @ images @ blur.T
    resized = resize @ images @ resize.T
    low, high = images.amin(dim=(1, 2, 3)), images.amax(dim=(1, 2, 3))
    resized = torch.maximum(torch.minimum(resized, high[:, None, None, None]), low[:, None, None, None])
    return torch.floor(resized * 255)


def to_channels(images, channels):
    """uint8 (B, H, W, C) -> (B, H, W, channels), converted as PIL's convert("L") / convert("RGB")."""
    if images.shape[3] == channels:
        return images
    if channels == 3:
        return images.expand(-1, -1, -1, 3)
    red, green, blue = images.int().unbind(3)  # scalar weights: no weight tensor copied to the device
    grey = red * 19595 + green * 38470 + blue * 7471 + 32768
    return grey.bitwise_right_shift(16).to(torch.uint8).unsqueeze(3)


def crop_box(height, width, celeba):
    if celeba:
        if (width, height) != CELEBA_SIZE:
            raise ValueError(f"are {width}x{height}, not the {CELEBA_SIZE[0]}x{CELEBA_SIZE[1]} of aligned CelebA")
        return CELEBA_CROP
    side = min(width, height)
    left, upper = (width - side) // 2, (height - side) // 2
    return left, upper, left + side, upper + side


def preprocess_levels(images, size, channels, celeba, augmentations=None, dtype=torch.float32):
    """uint8 (B, H, W, C) -> float (B, channels, size, size) holding the integer grey levels 0..255
    that preprocess.preprocess gives each image (augmentations: draw_batch's, or None)."""
    images = to_channels(images, channels)
    height, width = images.shape[1:3]
    left, upper, right, lower = crop_box(height, width, celeba)
    images = images.permute(0, 3, 1, 2).to(dtype) / 255.0
    if augmentations is None:
        images = images[:, :, upper:lower, left:right]
    else:  # the whole image is warped, but only the crop is needed
        images = warp(images, inverse_maps(augmentations, (height, width)), (left, upper, right, lower))
        images = colour(images.clamp(0.0, 1.0), augmentations)
    return lowpass_resize(images, size)


def preprocess_uint8(images, size, channels, celeba, augmentations=None, dtype=torch.float32):
    """uint8 (B, H, W, C) -> uint8 (B, size, size, channels): preprocess.preprocess, batched."""
    levels = preprocess_levels(images, size, channels, celeba, augmentations, dtype)
    return levels.to(torch.uint8).permute(0, 2, 3, 1)


def preprocess_batch(images, size, channels, celeba, augmentations=None, flips=None, dtype=torch.float32):
    """uint8 (B, H, W, C) -> float32 (B, channels, size, size) in [-1, 1] on the input's device: what
    the DataLoader path hands the model (datasets.to_tensor), flipped horizontally where flips (bool
    (B,)) is True. augmentations: draw_batch(places) for the authors' augmentation, or None."""
    levels = preprocess_levels(images, size, channels, celeba, augmentations, dtype)
    batch = levels.float().div_(127.5).sub_(1.0)
    if flips is not None:
        batch = torch.where(flips.to(batch.device)[:, None, None, None], batch.flip(3), batch)
    return batch
