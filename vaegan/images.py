"""PNG grids of images (PIL + numpy; torchvision is deliberately not a dependency)."""
import io
import math

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_write


def grid(images, columns=8, padding=2):
    """(N, C, H, W) in [-1, 1] -> uint8 array (rows*(H+p)+p, columns*(W+p)+p, C)."""
    # numpy, not torch, from here: grids are encoded on the writer's thread, where a torch operation
    # would start a second team of intra-op threads that then competes with the training loop's
    images = images.detach()
    if images.is_cuda or images.dtype not in (torch.float32, torch.float64):
        images = images.float().cpu()
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    pixels = np.round((np.clip(images.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        canvas[top:top + h, left:left + w] = pixels[i]
    return canvas


def save_grid(path, images, columns=8):
    array = grid(images, columns)
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def interleave(originals, reconstructions):
    """Pairs side by side: original, reconstruction, original, ..."""
    return torch.stack([originals, reconstructions], dim=1).flatten(0, 1)
