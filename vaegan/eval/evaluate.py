"""`vaegan eval`: FID, KID, precision/recall and reconstruction errors of a trained run."""
import hashlib
import json
import os

import numpy as np
import torch

from .. import checkpoint, load
from ..data import DataError, build_dataset
from ..data.datasets import BUILTIN, CELEBA_IMAGES
from . import features as inception
from .metrics import frechet_distance, gaussian_statistics, kernel_inception_distance, precision_recall


def is_celeba(data):
    return data != BUILTIN and os.path.isdir(os.path.join(data, CELEBA_IMAGES))


def evaluation_split(data):
    """CelebA's test partition; other data have no held-out split and are used whole (as build_dataset's "train")."""
    return "test" if is_celeba(data) else "train"


def describe_real_images(data, dataset, split, n, training_data):
    """The real images of eval's first line, honestly: CelebA's split by name; other data by what they are."""
    first = f"all {n}" if n == len(dataset) else f"the first {n} of {len(dataset)}"
    if is_celeba(data):
        return f"{first} images of CelebA's {split} split in {data}"
    where = "the built-in faces" if data == BUILTIN else data
    own = os.path.abspath(data) == os.path.abspath(training_data)
    return f"{first} images of {where}: no split" + (", the run's own training images" if own else "")


def real_batches(dataset, n, batch_size):
    for start in range(0, n, batch_size):
        yield torch.stack([dataset[(i, False)][0] for i in range(start, min(n, start + batch_size))])


def model_attributes(model, dataset):
    """The data's attributes in the columns a conditional model takes (N, A); None for other models."""
    if not model.conditional:
        return None
    missing = [a for a in model.attribute_names if a not in dataset.attribute_names]
    if missing:
        raise DataError(f"{dataset.name}: the conditional model takes attributes {', '.join(model.attribute_names)}; "
                        f"the data's attribute file lacks {', '.join(missing)}" if dataset.attribute_names else
                        f"{dataset.name}: no attribute file, and the conditional model needs its attributes")
    return dataset.attributes[:, [dataset.attribute_names.index(a) for a in model.attribute_names]]


def rows(table, start, stop):
    return None if table is None else table[start:stop]


def cached_real_features(run, dataset, data, split, cfg, n, batch_size, network, digest, device, log):
    """Inception features of the first n real images, cached beside the run, keyed by everything
    that determines them: the data, the split, the preprocessing, n and the network."""
    key_text = json.dumps([os.path.abspath(data) if data != BUILTIN else data, split, cfg["image_size"],
                           cfg["channels"], n, digest, inception.INPUT_SIZE])
    key = hashlib.sha1(key_text.encode()).hexdigest()[:16]
    path = os.path.join(run, f"fid-real-{key}.npz")
    if os.path.exists(path):
        log(f"vaegan eval: real-set features from the cache {path}")
        return np.load(path)["features"].astype(np.float64)
    features = inception.inception_features(network, real_batches(dataset, n, batch_size), n, device,
                                            desc="real images").numpy()
    checkpoint.atomic_write(path, lambda f: np.savez(f, features=features.astype(np.float32), key=key_text))
    return features


@torch.no_grad()
def reconstruction_errors(model, dataset, n, batch_size, device):
    """Mean squared pixel error and mean per-image Dis_l error 1/2||.||^2 of Dec(mu(x)) on n real images."""
    if model.encoder is None:
        return None, None
    pixel, feature = [], []
    table = model_attributes(model, dataset)
    for start, images in zip(range(0, n, batch_size), real_batches(dataset, n, batch_size)):
        x = images.to(device)
        y = rows(table, start, start + len(x))
        x_rec = model.reconstruct(x, y)
        pixel.append(((x_rec - x) ** 2).mean(dim=(1, 2, 3)))
        if model.discriminator is not None:
            y = model.check_attributes(y, len(x))
            diff = (model.discriminator(x_rec, y, features_only=True)
                    - model.discriminator(x, y, features_only=True))
            feature.append(0.5 * diff.flatten(1).pow(2).sum(1))
    return torch.cat(pixel).mean().item(), (torch.cat(feature).mean().item() if feature else None)


def evaluate(run, num_samples=1000, data=None, batch_size=50, device="cpu", seed=0, log=print, model=None):
    """`model`: the run's model if the caller has loaded it already (vaegan.load)."""
    model = model or load(run, device)
    cfg = model.run_config
    run_dir = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    data = data or cfg["data"]
    split = evaluation_split(data)
    dataset = build_dataset(data, split, cfg["image_size"], cfg["channels"])
    n = min(num_samples, len(dataset))
    if n < 2:
        raise DataError(f"--num-samples must be at least 2, and the data must hold 2 images (got {n})")
    network = inception.load_inception(device)
    digest = inception.weights_digest(inception.weights_path())
    log(f"vaegan eval: {n} real images ({describe_real_images(data, dataset, split, n, cfg['data'])}) "
        f"against {n} samples of step {model.run_step}")
    real = cached_real_features(run_dir, dataset, data, split, cfg, n, batch_size, network, digest, device, log)

    table = model_attributes(model, dataset)  # conditional models generate with the real images' attributes

    def generated_batches():
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            yield model.sample(count, seed=seed + start, attributes=rows(table, start, start + count))
    fake = inception.inception_features(network, generated_batches(), n, device, desc="samples").numpy()
    fid = frechet_distance(*gaussian_statistics(real), *gaussian_statistics(fake))
    kid = kernel_inception_distance(real, fake, subset_size=min(1000, n))  # n <= 1000: one subset, no std
    precision, recall = precision_recall(real, fake)
    pixel_error, feature_error = reconstruction_errors(model, dataset, n, batch_size, device)
    result = {"step": model.run_step, "num_samples": n, "fid": fid, "kid": kid.mean, "kid_std": kid.std,
              "kid_subsets": kid.subsets, "kid_subset_size": kid.subset_size,
              "precision": precision, "recall": recall, "reconstruction_pixel_mse": pixel_error,
              "reconstruction_dis_l_error": feature_error, "data": data,
              "split": split if is_celeba(data) else None, "data_images": len(dataset)}
    checkpoint.write_json(os.path.join(run_dir, f"eval-{model.run_step:07d}.json"), result)
    return result


def format_kid(result):
    subsets, size = result["kid_subsets"], result["kid_subset_size"]
    if result["kid_std"] is None:
        return f"KID {result['kid']:.5f} ({subsets} subset of n={size})"
    return (f"KID {result['kid']:.5f} +- {result['kid_std']:.5f} "
            f"(std over {subsets} subsets of {size} of n={result['num_samples']})")


def format_result(result):
    n = result["num_samples"]
    lines = [f"FID {result['fid']:.3f} (n={n})", format_kid(result),
             f"precision {result['precision']:.3f}, recall {result['recall']:.3f} (n={n}, k=3)"]
    if result["reconstruction_pixel_mse"] is not None:
        lines.append(f"reconstruction: pixel MSE {result['reconstruction_pixel_mse']:.5f} (n={n})")
    if result["reconstruction_dis_l_error"] is not None:
        lines.append(f"reconstruction: Dis_l error {result['reconstruction_dis_l_error']:.2f} per image (n={n})")
    return "\n".join(lines)
