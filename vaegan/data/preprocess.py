"""Image preprocessing on the CPU (PIL): the paper's CelebA crop, the low-pass and the resize."""
import numpy as np
from PIL import Image, ImageFilter

CELEBA_SIZE = (178, 218)  # (width, height) of img_align_celeba
CELEBA_CROP = (15, 40, 163, 188)  # (left, upper, right, lower): rows 40..188, columns 15..163
# The authors low-pass with sigma ~0.76 before shrinking the 148-pixel crop to 64 pixels; we keep
# the same sigma per unit of shrink factor (0.76 / (148/64) = 0.33) for every size.
SIGMA_PER_SHRINK = 0.76 / (148 / 64)


def centre_square(image):
    w, h = image.size
    side = min(w, h)
    left, upper = (w - side) // 2, (h - side) // 2
    return image.crop((left, upper, left + side, upper + side))


def lowpass_resize(image, size):
    """Gaussian low-pass scaled to the shrink factor (none when enlarging), then bilinear resize."""
    shrink = image.size[0] / size
    if shrink > 1:
        image = image.filter(ImageFilter.GaussianBlur(radius=SIGMA_PER_SHRINK * shrink))  # radius is sigma
    return image.resize((size, size), Image.BILINEAR)


def to_mode(image, channels):
    return image.convert("L" if channels == 1 else "RGB")


def preprocess(image, size, channels, celeba):
    """PIL image -> uint8 array (size, size, channels), cropped, low-passed and resized."""
    image = to_mode(image, channels)
    if celeba:
        if image.size != CELEBA_SIZE:
            raise ValueError(f"is {image.size[0]}x{image.size[1]}, not the {CELEBA_SIZE[0]}x{CELEBA_SIZE[1]} "
                             "of aligned CelebA")
        image = image.crop(CELEBA_CROP)
    else:
        image = centre_square(image)
    array = np.array(lowpass_resize(image, size), dtype=np.uint8)
    return array.reshape(size, size, channels)
