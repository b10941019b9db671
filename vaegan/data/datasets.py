"""Image datasets: CelebA's layout, any folder of JPEG/PNG images, and the built-in faces.

Every dataset yields (image, attributes, unreadable): image a float tensor (C, H, W) in
[-1, 1], horizontally flipped when asked; attributes a float tensor of +-1 (empty where the
data has none); unreadable the paths that failed to decode on the way (see ImageFiles).
"""
import os

import numpy as np
import torch
from PIL import Image, ImageFile

from ..models import check_image_size
from .augment import draw as draw_augmentation
from .preprocess import CELEBA_SIZE, lowpass_resize, preprocess, to_mode

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
BUILTIN = "builtin:faces"
CELEBA_IMAGES, CELEBA_PARTITION, CELEBA_ATTRIBUTES = "img_align_celeba", "list_eval_partition.txt", "list_attr_celeba.txt"
SPLITS = ("train", "test")
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decoded_side(image_size, augment):
    """The side a folder's images are decoded at (their centred square, low-passed and resized with the
    authors' order-3 spline): the run's size itself without augmentation, so that the device has
    nothing left but the flip (the per-image path's grey levels exactly); twice it with the authors'
    augmentation, whose warp and colour then work at twice the output's resolution before the final
    blur and resize. Either differs slightly from the per-image path, which warps the whole image
    and resizes its square once (vaegan/data/device_preprocess.py)."""
    return image_size * 2 if augment else image_size


class DataError(Exception):
    """A problem with the user's data, stated in one line that names the file or value."""


def to_tensor(array, flip):
    """uint8 (H, W, C) -> float (C, H, W) in [-1, 1]."""
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return image.flip(2) if flip else image


class InMemoryImages(torch.utils.data.Dataset):
    """Preprocessed uint8 images held in memory."""

    in_memory = True

    def __init__(self, images, name):
        self.images, self.name = images, name  # (N, H, W, C) uint8
        self.attributes = torch.zeros(len(images), 0)
        self.attribute_names = []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, flip = item[:2]
        return to_tensor(self.images[index], flip), self.attributes[index], ()


def builtin_faces(image_size, channels):
    """The 100 LFW face crops (25x25, grayscale) that ship inside scikit-image, enlarged bilinearly
    (an order-3 spline's overshoot left the demo's decoder more of its checkerboard to undo:
    bench/results/demo-faces/results.md)."""
    try:
        from skimage import transform
        from skimage.data import lfw_subset
    except ImportError as e:
        raise DataError(f"the built-in faces come with scikit-image, which is not installed ({e}); "
                        "pip install scikit-image, or pass --data DIR") from None
    faces = lfw_subset()[:100]  # float in [0, 1]; the first 100 are faces
    enlarged = np.stack([transform.resize(f, (image_size, image_size), order=1, mode="reflect", anti_aliasing=False)
                         for f in faces])
    images = (np.clip(enlarged, 0, 1) * 255).astype(np.uint8)[..., None].repeat(channels, axis=3)
    return InMemoryImages(images, f"{BUILTIN} (25 px enlarged bilinearly)")


class ImageFiles(torch.utils.data.Dataset):
    """Images decoded from files on each access (in DataLoader workers).

    A file that fails to decode is skipped: the next file in order takes its place in the
    batch, and its path travels back with the sample so that the trainer counts and reports it.
    """

    in_memory = False

    def __init__(self, paths, image_size, channels, celeba, name, attributes=None, attribute_names=()):
        self.paths, self.image_size, self.channels, self.celeba, self.name = paths, image_size, channels, celeba, name
        self.augment = False  # True: the authors' augmentation, drawn from each item's (seed, step, slot)
        self.attributes = attributes if attributes is not None else torch.zeros(len(paths), 0)
        self.attribute_names = list(attribute_names)

    def __len__(self):
        return len(self.paths)

    def load(self, index, augmentation=None):
        path = self.paths[index]
        with Image.open(path) as image:
            return preprocess(image, self.image_size, self.channels, self.celeba, augmentation)

    def decoded_shape(self, augment=None):
        """(H, W, C) of decode's arrays: CelebA's whole 218x178, or a folder's square at decoded_side."""
        if self.celeba:
            return CELEBA_SIZE[1], CELEBA_SIZE[0], self.channels
        side = decoded_side(self.image_size, self.augment if augment is None else augment)
        return side, side, self.channels

    def decode(self, index):
        """uint8 (H, W, C) as decoded_shape says: the input of device_preprocess.preprocess_batch."""
        with Image.open(self.paths[index]) as image:
            image = to_mode(image, self.channels)
            if self.celeba and image.size != CELEBA_SIZE:
                raise ValueError(f"is {image.size[0]}x{image.size[1]}, not the {CELEBA_SIZE[0]}x{CELEBA_SIZE[1]} "
                                 "of aligned CelebA")
            array = np.array(image, dtype=np.uint8).reshape(image.size[1], image.size[0], self.channels)
        if self.celeba:
            return array
        height, width = array.shape[:2]
        side = min(width, height)
        left, upper = (width - side) // 2, (height - side) // 2
        square = array[upper:upper + side, left:left + side]
        wanted = self.decoded_shape()[0]
        return np.ascontiguousarray(square) if side == wanted else lowpass_resize(square, wanted)

    def first_readable(self, index, read):
        """(read(candidate), candidate, unreadable): the file at `index`, or the next readable one in
        order in its place, with the paths (and errors) of those skipped."""
        unreadable = []
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            try:
                return read(candidate), candidate, tuple(unreadable)
            except UNREADABLE_ERRORS as e:
                unreadable.append(f"{self.paths[candidate]} ({e})")
        raise DataError(f"{self.name}: no image could be read (first failure: {unreadable[0]})")

    def __getitem__(self, item):
        """The per-image CPU path (preprocess.preprocess), for the sample grids and as the reference the
        batched path is tested against; the loaders decode (`decode`) and preprocess batches."""
        index, flip = item[:2]
        augmentation = draw_augmentation(*item[2]) if self.augment and len(item) > 2 else None
        array, candidate, unreadable = self.first_readable(index, lambda i: self.load(i, augmentation))
        return to_tensor(array, flip), self.attributes[candidate], unreadable


def find_images(root):
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def read_partition(path):
    """list_eval_partition.txt -> {file name: 0 train, 1 val, 2 test}."""
    partition = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DataError(f"{path} line {number}: expected 'FILE 0|1|2', got {line.strip()!r}")
            partition[fields[0]] = int(fields[1])
    if not partition:
        raise DataError(f"{path}: no entries")
    return partition


def read_attributes(path):
    """list_attr_celeba.txt -> ({file name: [+-1, ...]}, attribute names)."""
    with open(path) as f:
        lines = f.read().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataError(f"{path} line 1: expected the number of images, got {lines[0].strip() if lines else ''!r}")
    count, names = int(lines[0]), lines[1].split()
    if not names:
        raise DataError(f"{path} line 2: expected the attribute names")
    table = {}
    for number, line in enumerate(lines[2:], 3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise DataError(f"{path} line {number}: expected a file name and {len(names)} values, "
                            f"got {len(fields)} fields")
        if any(v not in ("1", "-1") for v in fields[1:]):
            raise DataError(f"{path} line {number}: attribute values must be 1 or -1")
        table[fields[0]] = [int(v) for v in fields[1:]]
    if len(table) != count:
        raise DataError(f"{path}: line 1 announces {count} images, the file lists {len(table)}")
    return table, names


def folder_attributes(root, paths):
    """A folder's list_attr_celeba.txt (CelebA's format, keyed by file name), if it has one."""
    path = os.path.join(root, CELEBA_ATTRIBUTES)
    if not os.path.isfile(path):
        return None, []
    table, names = read_attributes(path)
    missing = [p for p in paths if os.path.basename(p) not in table]
    if missing:
        raise DataError(f"{path}: no attributes for {missing[0]} ({len(missing)} images without)")
    return torch.tensor([table[os.path.basename(p)] for p in paths], dtype=torch.float32), names


def celeba(root, split, image_size, channels):
    """CelebA's aligned images: train = partitions 0 and 1, test = partition 2."""
    image_dir = os.path.join(root, CELEBA_IMAGES)
    partition_path = os.path.join(root, CELEBA_PARTITION)
    if not os.path.isfile(partition_path):
        raise DataError(f"{partition_path}: missing (CelebA's layout needs {CELEBA_IMAGES}/ and {CELEBA_PARTITION})")
    partition = read_partition(partition_path)
    wanted = (0, 1) if split == "train" else (2,)
    names = sorted(n for n, p in partition.items() if p in wanted)
    present = set(os.listdir(image_dir))
    missing = [n for n in names if n not in present]
    if missing:
        raise DataError(f"{os.path.join(image_dir, missing[0])}: listed in {CELEBA_PARTITION} but missing "
                        f"({len(missing)} listed files missing)")
    if not names:
        raise DataError(f"{partition_path}: the {split} split is empty")
    attributes, attribute_names = None, []
    attribute_path = os.path.join(root, CELEBA_ATTRIBUTES)
    if os.path.isfile(attribute_path):
        table, attribute_names = read_attributes(attribute_path)
        unlisted = [n for n in names if n not in table]
        if unlisted:
            raise DataError(f"{attribute_path}: no attributes for {unlisted[0]} ({len(unlisted)} images without)")
        attributes = torch.tensor([table[n] for n in names], dtype=torch.float32)
    paths = [os.path.join(image_dir, n) for n in names]
    return ImageFiles(paths, image_size, channels, True, f"CelebA {split} ({root})", attributes, attribute_names)


def build_dataset(data, split, image_size, channels):
    """`data` is BUILTIN, a CelebA root (it holds img_align_celeba/) or any folder of images."""
    check_image_size(image_size)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, not {channels}")
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if data == BUILTIN:
        return builtin_faces(image_size, channels)
    if not os.path.exists(data):
        raise DataError(f"{data}: no such directory")
    if not os.path.isdir(data):
        raise DataError(f"{data}: not a directory")
    if os.path.isdir(os.path.join(data, CELEBA_IMAGES)):
        dataset = celeba(data, split, image_size, channels)
    else:
        paths = find_images(data)
        if not paths:
            raise DataError(f"{data}: no JPEG or PNG images found (searched recursively)")
        attributes, attribute_names = folder_attributes(data, paths)
        dataset = ImageFiles(paths, image_size, channels, False, f"images in {data}", attributes, attribute_names)
    first_readable(dataset)
    return dataset


def first_readable(dataset):
    """Fail now, naming the file, if the data is not what the networks can take at all."""
    try:
        dataset.load(0)
    except ValueError as e:
        raise DataError(f"{dataset.paths[0]}: {e}") from None
    except (OSError, SyntaxError):
        pass  # a corrupt first file is skipped like any other
