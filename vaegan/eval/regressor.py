"""The attribute regressor of the conditional experiment (the paper's attribute-conditional generation) and the paper's Table 1.

A small CNN is trained on real images to read their attributes (+-1 targets, squared error).
It then scores conditional generation: images are generated from the attribute vectors of held-out
real images, and the regressor's reading of each generated image is compared with the vector it
was generated from (cosine similarity, mean squared error), beside the same scores of the held-out
real images themselves.
"""
import os
import sys

import torch
from torch import nn
from tqdm import tqdm

from .. import checkpoint, load
from ..data import DataError, StepBatchSampler, build_dataset, make_loader
from ..data.datasets import BUILTIN, CELEBA_IMAGES
from ..models import check_image_size
from .evaluate import rows

REGRESSOR_KIND = "vaegan-attribute-regressor"
HOLD_OUT_EVERY = 10  # folders without a split: every 10th image is held out
# The paper's Table 1 (LFW, its own regressor and attributes): cosine similarity, mean squared error.
PAPER_TABLE_1 = (("LFW test set", 0.9193, 14.20), ("VAE", 0.9030, 27.59), ("GAN", 0.8892, 27.89),
                 ("VAE/GAN", 0.9114, 22.40))


class AttributeRegressor(nn.Module):
    """Stride-2 convolutions down to 4x4, global average pooling, one linear read-out per attribute."""

    def __init__(self, image_size, channels, num_attributes, width=32):
        super().__init__()
        check_image_size(image_size)
        layers, in_ch, size, stage = [], channels, image_size, 0
        while size > 4:
            out_ch = width * 2 ** min(stage, 2)
            layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]
            in_ch, size, stage = out_ch, size // 2, stage + 1
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.read_out = nn.Linear(in_ch, num_attributes)

    def forward(self, x):
        return self.read_out(self.body(x))


class Indexed(torch.utils.data.Dataset):
    """The images `indices` of `dataset`, renumbered from 0 (the samplers' (index, flip) items)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices, self.in_memory = dataset, list(indices), dataset.in_memory

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        index, flip = item[:2]
        return self.dataset[(self.indices[index], flip)]


def splits(data, image_size, channels):
    """((train data, indices), (held-out data, indices)): CelebA's train and test partitions, or for
    any other folder every HOLD_OUT_EVERY-th image held out."""
    if data == BUILTIN:
        raise DataError(f"{BUILTIN} has no attributes: the regressor needs data with an attribute file")
    if os.path.isdir(os.path.join(data, CELEBA_IMAGES)):
        train, test = build_dataset(data, "train", image_size, channels), build_dataset(data, "test", image_size, channels)
        return (train, range(len(train))), (test, range(len(test)))
    images = build_dataset(data, "train", image_size, channels)
    held_out = [i for i in range(len(images)) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    kept = [i for i in range(len(images)) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    if not held_out:
        raise DataError(f"{data}: {len(images)} images are too few to hold out every {HOLD_OUT_EVERY}th for testing")
    return (images, kept), (images, held_out)


def attribute_columns(dataset, names, data):
    if not dataset.attribute_names:
        raise DataError(f"{data}: no attribute file (list_attr_celeba.txt in CelebA's format) beside the images")
    names = list(names) if names else list(dataset.attribute_names)
    unknown = [a for a in names if a not in dataset.attribute_names]
    if unknown:
        raise DataError(f"attributes {', '.join(unknown)} are not in the attribute file "
                        f"(it has {', '.join(dataset.attribute_names)})")
    return names, [dataset.attribute_names.index(a) for a in names]


def batches(dataset, indices, columns, batch_size):
    """(images, attributes) of dataset[indices] in order, unflipped."""
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        yield (torch.stack([dataset[(i, False)][0] for i in chunk]), dataset.attributes[chunk][:, columns])


@torch.no_grad()
def read_attributes(regressor, images_and_targets, device):
    """(predictions, targets) over every batch, on the CPU."""
    regressor.eval()
    predictions, targets = [], []
    for images, target in images_and_targets:
        predictions.append(regressor(images.to(device)).float().cpu())
        targets.append(target.float())
    return torch.cat(predictions), torch.cat(targets)


def accuracies(predictions, targets):
    """Per attribute: the fraction of images whose sign the regressor reads right."""
    return ((predictions > 0) == (targets > 0)).float().mean(0)


def train_regressor(data, out, image_size=64, channels=3, names=None, epochs=5, batch_size=64, lr=1e-3, workers=4,
                    device="cpu", seed=0, log=print):
    """Trains the regressor on the training images and writes it to `out`; returns its summary."""
    if os.path.isdir(out):
        raise DataError(f"--out {out} is a directory: give the file to write (e.g. {os.path.join(out, 'regressor.pt')})")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    torch.manual_seed(seed)
    (train, train_indices), (test, test_indices) = splits(data, image_size, channels)
    names, columns = attribute_columns(train, names, data)
    train_set = Indexed(train, train_indices)
    sampler_probe = StepBatchSampler(len(train_set), min(batch_size, len(train_set)), 0, 1, seed, 0, 1)
    steps = epochs * sampler_probe.steps_per_epoch
    sampler = StepBatchSampler(len(train_set), sampler_probe.batch_size, 0, 1, seed, 0, steps, flip=True)
    loader = make_loader(train_set, sampler, workers, pin_memory=torch.device(device).type == "cuda")
    regressor = AttributeRegressor(image_size, channels, len(names)).to(device)
    optimizer = torch.optim.Adam(regressor.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    log(f"vaegan regressor: {len(names)} attributes, {len(train_set)} training and {len(test_indices)} held-out "
        f"images of {data}, {epochs} epochs of {sampler.steps_per_epoch} steps, batch {sampler.batch_size}")
    regressor.train()
    progress = tqdm(loader, total=steps, unit="step", desc="regressor", file=sys.stderr, dynamic_ncols=True)
    for images, attributes, _ in progress:
        loss = (regressor(images.to(device)) - attributes[:, columns].to(device)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    predictions, targets = read_attributes(regressor, batches(test, test_indices, columns, 256), device)
    per_attribute = accuracies(predictions, targets)
    majority = torch.maximum((targets > 0).float().mean(0), (targets < 0).float().mean(0))
    summary = {"kind": REGRESSOR_KIND, "data": data, "image_size": image_size, "channels": channels,
               "attribute_names": names, "num_train": len(train_set), "num_held_out": len(test_indices),
               "held_out_accuracy": per_attribute.mean().item(), "majority_baseline": majority.mean().item(),
               "per_attribute_accuracy": dict(zip(names, per_attribute.tolist()))}
    checkpoint.save(out, {**summary, "state": {k: v.cpu() for k, v in regressor.state_dict().items()}})
    return summary


def format_regressor_summary(summary):
    worst = sorted(summary["per_attribute_accuracy"].items(), key=lambda kv: kv[1])[:3]
    return (f"held-out accuracy {summary['held_out_accuracy']:.4f} over {len(summary['attribute_names'])} attributes "
            f"(n={summary['num_held_out']}; always guessing each attribute's commoner value: "
            f"{summary['majority_baseline']:.4f}); hardest: " + ", ".join(f"{a} {v:.3f}" for a, v in worst))


def load_regressor(path, device="cpu"):
    state = checkpoint.load(path)
    if state.get("kind") != REGRESSOR_KIND:
        raise DataError(f"{path}: not an attribute regressor (write one with `vaegan regressor`)")
    regressor = AttributeRegressor(state["image_size"], state["channels"], len(state["attribute_names"]))
    regressor.load_state_dict(state["state"])
    return regressor.to(device).eval(), state


def similarity_scores(predictions, targets):
    """(mean cosine similarity between each image's target and read attributes, mean squared error)."""
    cosine = nn.functional.cosine_similarity(predictions, targets, dim=1).mean().item()
    return cosine, (predictions - targets).pow(2).mean().item()


def attribute_scores(runs, regressor_path, out, num_samples=1000, batch_size=100, device="cpu", seed=0, log=print):
    """Table 1: scores of the real held-out images and of each conditional run's generations from
    their attribute vectors. Writes OUT/attribute_scores.md and .json; returns the rows."""
    regressor, info = load_regressor(regressor_path, device)
    models = [load(run, device) for run in runs]
    for run, model in zip(runs, models):
        if not model.conditional:
            raise DataError(f"{run}: a {model.kind!r} run is not conditional (train with --model cvaegan, cvae or cgan)")
        shape = (model.image_size, model.channels)
        if shape != (info["image_size"], info["channels"]):
            raise DataError(f"{run} makes {shape[0]}x{shape[0]}x{shape[1]} images, the regressor reads "
                            f"{info['image_size']}x{info['image_size']}x{info['channels']}: train it with "
                            f"--image-size {shape[0]} --channels {shape[1]}")
        missing = [a for a in model.attribute_names if a not in info["attribute_names"]]
        if missing:
            raise DataError(f"{run} conditions on {', '.join(missing)}, which the regressor does not read")
    names = models[0].attribute_names
    for run, model in zip(runs[1:], models[1:]):
        if model.attribute_names != names:
            raise DataError(f"{runs[0]} and {run} condition on different attributes: compare like with like")
    _, (test, test_indices) = splits(info["data"], info["image_size"], info["channels"])
    _, columns = attribute_columns(test, names, info["data"])
    read_columns = [info["attribute_names"].index(a) for a in names]
    test_indices = list(test_indices)[:num_samples]
    n = len(test_indices)
    targets = test.attributes[test_indices][:, columns]

    def read(batches_of_images):
        predictions, _ = read_attributes(regressor, ((b, torch.zeros(0)) for b in batches_of_images), device)
        return predictions[:, read_columns]

    log(f"vaegan attribute-scores: {n} held-out images of {info['data']}, {len(names)} attributes")
    table = [{"images": "real held-out images", "step": None, "num_samples": n,
              **dict(zip(("cosine_similarity", "mean_squared_error"),
                         similarity_scores(read(b for b, _ in batches(test, test_indices, columns, batch_size)),
                                           targets)))}]
    for run, model in zip(runs, models):
        def generated():
            for start in tqdm(range(0, n, batch_size), desc=f"{model.kind} samples", file=sys.stderr, leave=False):
                y = rows(targets, start, start + batch_size)
                yield model.sample(len(y), seed=seed + start, attributes=y)
        cosine, mse = similarity_scores(read(generated()), targets)
        table.append({"images": f"{os.path.basename(os.path.normpath(run))} ({model.kind})", "step": model.run_step,
                      "num_samples": n, "cosine_similarity": cosine, "mean_squared_error": mse})
    lines = ["# Attribute similarity of conditional generation (the paper's Table 1)", "",
             f"Targets: the attribute vectors of {n} held-out images of `{info['data']}` ({len(names)} attributes, "
             f"+-1). Each conditional run generates one image per vector (z ~ N(0, I), seed {seed}); the attribute "
             f"regressor (`{regressor_path}`, held-out accuracy {info['held_out_accuracy']:.4f}) reads the attributes "
             "off each image. Cosine similarity (higher is better) and mean squared error per attribute (lower is "
             "better) between the vector an image was generated from and the regressor's reading; the first row "
             "reads the real images themselves.", "",
             "| images | step | n | cosine similarity | mean squared error |", "|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['images']} | {row['step'] if row['step'] is not None else '-'} | {row['num_samples']} | "
                     f"{row['cosine_similarity']:.4f} | {row['mean_squared_error']:.4f} |")
    lines += ["", "The paper's own numbers, for reference (LFW with its continuous attribute scores and another "
              "regressor, so not comparable in scale; its squared error is not per attribute):", "",
              "| images (paper, LFW) | cosine similarity | mean squared error |", "|---|---|---|"]
    lines += [f"| {name} | {cosine:.4f} | {mse:.2f} |" for name, cosine, mse in PAPER_TABLE_1]
    os.makedirs(out, exist_ok=True)
    checkpoint.atomic_write(os.path.join(out, "attribute_scores.md"), lambda f: f.write(("\n".join(lines) + "\n").encode()))
    checkpoint.write_json(os.path.join(out, "attribute_scores.json"),
                          {"regressor": regressor_path, "attributes": names, "rows": table})
    return table
