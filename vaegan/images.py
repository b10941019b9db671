"""PNG grids of images (PIL + numpy; torchvision is deliberately not a dependency), and the run's sample grids."""
import io
import math
import os

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_write, snapshot


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


class SampleGrids:
    """The run's picture of its progress: samples from fixed prior codes, and the first training
    images beside their reconstructions, each a PNG grid at a step. Every process computes
    (GlobalBatchNorm's statistics are collective); the main one writes, on the writer's thread."""

    def __init__(self, model, dataset, latent_size, seed, out, is_main, attribute_columns=None, count=32):
        self.model, self.out, self.is_main = model, out, is_main
        param = next(model.parameters())
        self.noise = torch.randn(count, latent_size, generator=torch.Generator().manual_seed(seed)).to(param)
        self.originals = torch.stack([dataset[(i, False)][0] for i in range(min(count // 2, len(dataset)))]).to(param)
        self.sample_attributes = self.original_attributes = None
        if attribute_columns is not None:  # samples take the attributes of the first training images, in turn
            table = dataset.attributes[:, attribute_columns].to(param)
            self.sample_attributes = table[torch.arange(count) % len(table)]
            self.original_attributes = table[:len(self.originals)]

    def save(self, step, writer):
        model = self.model
        with model.batch_statistics():
            samples = model.decoder(self.noise, self.sample_attributes)
            pairs = None
            if model.encoder is not None:
                mu, _ = model.encoder(self.originals, self.original_attributes)
                pairs = interleave(self.originals, model.decoder(mu, self.original_attributes))
        if self.is_main:  # copied and encoded as PNG on the writer's thread
            grids = snapshot({"samples": samples, "reconstructions": pairs})
            writer.submit(lambda: [save_grid(os.path.join(self.out, f"{name}-{step:07d}.png"), images)
                                   for name, images in grids.items() if images is not None])
