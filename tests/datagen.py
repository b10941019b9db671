"""Generated image data for tests and benchmarks: CelebA's layout and plain folders."""
import os

import numpy as np
from PIL import Image


def random_image(rng, width, height, mode="RGB"):
    """A smooth random image (JPEG-friendly): low-frequency noise, enlarged."""
    channels = 3 if mode == "RGB" else 1
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), channels), dtype=np.uint8)
    image = Image.fromarray(small[:, :, 0] if channels == 1 else small)
    return image.resize((width, height), Image.BILINEAR)


def make_celeba(root, n=30, attributes=True, size=(178, 218), seed=0):
    """CelebA's layout with n generated 178x218 JPEGs; partitions cycle train, train, val, test."""
    rng = np.random.default_rng(seed)
    images = os.path.join(root, "img_align_celeba")
    os.makedirs(images, exist_ok=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        random_image(rng, *size).save(os.path.join(images, name), quality=95)
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        for i, name in enumerate(names):
            f.write(f"{name} {(0, 0, 1, 2)[i % 4]}\n")
    if attributes:
        attribute_names = ["Smiling", "Male", "Young"]
        with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
            f.write(f"{n}\n{' '.join(attribute_names)}\n")
            for i, name in enumerate(names):
                values = [1 if (i >> b) & 1 else -1 for b in range(len(attribute_names))]
                f.write(name + "  " + " ".join(f"{v:2d}" for v in values) + "\n")
    return names


def make_folder(root, n=20, nested=True, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = os.path.join(root, f"sub{i % 3}") if nested else root
        os.makedirs(folder, exist_ok=True)
        ext = ".png" if i % 2 else ".jpg"
        path = os.path.join(folder, f"img{i:03d}{ext}")
        random_image(rng, 40 + 3 * i, 50, mode).save(path)
        paths.append(path)
    return paths


def make_attribute_folder(root, n=300, size=40, seed=0):
    """A flat folder of n grayscale PNGs with a CelebA-format attribute file of two attributes:
    Bright (+1: light image, -1: dark; easy to see) and Lucky (a coin flip: nothing to see)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    bright, lucky = rng.integers(0, 2, n) * 2 - 1, rng.integers(0, 2, n) * 2 - 1
    with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
        f.write(f"{n}\nBright Lucky\n")
        for i in range(n):
            level = 170 if bright[i] > 0 else 85
            pixels = np.clip(rng.normal(level, 25, size=(size, size)), 0, 255).astype(np.uint8)
            name = f"face{i:04d}.png"
            Image.fromarray(pixels).save(os.path.join(root, name))
            f.write(f"{name} {bright[i]:2d} {lucky[i]:2d}\n")
    return bright, lucky


PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_celeba_from_photographs(root, per_photograph=2, test_every=0):
    """CelebA's layout with 178x218 PNG crops of real photographs that ship in scikit-image (real
    edges and textures, unlike the generated images): per_photograph crops of each, their offsets
    scattered over the photograph (rows in order, columns in a stride-37 order). Every image is in
    the training split, but with test_every > 0 every test_every-th crop is in the test split
    (partition 2); those overlap other crops of the same photograph, so held out, not unseen."""
    from skimage import data
    images = os.path.join(root, "img_align_celeba")
    os.makedirs(images, exist_ok=True)
    names = []
    for p, photo in enumerate(PHOTOGRAPHS):
        pixels = getattr(data, photo)()[..., :3]
        for k in range(per_photograph):
            top = (pixels.shape[0] - 218) * k // per_photograph
            left = (pixels.shape[1] - 178) * (k * 37 % per_photograph) // per_photograph
            name = f"{len(names) + 1:06d}.png"
            Image.fromarray(pixels[top:top + 218, left:left + 178]).save(os.path.join(images, name))
            names.append(name)
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        f.writelines(f"{name} {2 if test_every and i % test_every == test_every - 1 else 0}\n"
                     for i, name in enumerate(names))
    return names


def photograph_batch(n=8, size=64):
    """n real photographs from scikit-image as a (n, 3, size, size) batch in [-1, 1]: square crops
    (a photograph again at another offset after the six), area-averaged to size."""
    import torch
    from skimage import data
    batch = []
    for i in range(n):
        pixels = getattr(data, PHOTOGRAPHS[i % len(PHOTOGRAPHS)])()[..., :3]
        side = min(pixels.shape[:2]) * 3 // 4
        top, left = (pixels.shape[0] - side) * (i // len(PHOTOGRAPHS)) // 2, (pixels.shape[1] - side) // 2
        crop = torch.tensor(pixels[top:top + side, left:left + side]).permute(2, 0, 1).float()[None]
        batch.append(torch.nn.functional.interpolate(crop, size=(size, size), mode="area"))
    return torch.cat(batch) / 127.5 - 1
