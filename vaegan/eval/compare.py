"""The paper's first CelebA figure: several runs' samples and reconstructions side by side, and a
markdown table of their metrics."""
import os

import torch

from .. import checkpoint, load
from ..data import DataError, build_dataset
from ..images import save_grid
from .evaluate import evaluate, evaluation_split, model_attributes, real_batches, rows

TABLE_COLUMNS = ("FID", "KID", "precision", "recall", "pixel MSE", "Dis_l error")


def _cell(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"


def compare(runs, out, num_samples=1000, num_images=8, device="cpu", seed=0, log=print):
    """Writes OUT/comparison.png and OUT/comparison.md; returns the per-run results."""
    if len(runs) < 2:
        raise DataError("compare needs at least two runs")
    models = [load(run, device) for run in runs]
    configs = [model.run_config for model in models]
    shapes = {(c["image_size"], c["channels"]) for c in configs}
    if len(shapes) > 1:
        listing = ", ".join(f"{run}: {c['image_size']}x{c['image_size']}x{c['channels']}" for run, c in zip(runs, configs))
        raise DataError(f"the runs have different image sizes or channels ({listing}): compare like with like")
    size, channels = shapes.pop()
    data = configs[0]["data"]
    test = build_dataset(data, evaluation_split(data), size, channels)
    originals = next(real_batches(test, min(num_images, len(test)), num_images)).to(device)
    blank = torch.zeros_like(originals)  # a run without an encoder has no reconstructions
    sample_rows, reconstruction_rows, results = [], [originals], []
    for run, cfg, model in zip(runs, configs, models):
        y = rows(model_attributes(model, test), 0, len(originals))  # conditional runs: the test images' attributes
        sample_rows.append(model.sample(len(originals), seed=seed, attributes=y))
        reconstruction_rows.append(model.reconstruct(originals, y) if model.encoder is not None else blank)
        log(f"vaegan compare: evaluating {run} ({cfg['model']})")
        results.append(evaluate(run, num_samples, data, device=device, seed=seed, log=log, model=model))
    os.makedirs(out, exist_ok=True)
    save_grid(os.path.join(out, "comparison.png"), torch.cat(sample_rows + reconstruction_rows),
              columns=len(originals))
    names = [f"{os.path.basename(os.path.normpath(run))} ({cfg['model']})" for run, cfg in zip(runs, configs)]
    lines = ["# Comparison", "",
             f"`comparison.png`: rows 1-{len(runs)} are samples of " + ", ".join(names) + f"; row {len(runs) + 1} holds "
             f"test images and rows {len(runs) + 2}-{2 * len(runs) + 1} their reconstructions by the same runs, in the "
             "same order (black: the run has no encoder).", "",
             "| run | step | n | " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * (len(TABLE_COLUMNS) + 3)]
    for name, r in zip(names, results):
        cells = [_cell(r["fid"], 2), _cell(r["kid"], 4), _cell(r["precision"], 3), _cell(r["recall"], 3),
                 _cell(r["reconstruction_pixel_mse"], 4), _cell(r["reconstruction_dis_l_error"], 1)]
        lines.append(f"| {name} | {r['step']} | {r['num_samples']} | " + " | ".join(cells) + " |")
    checkpoint.atomic_write(os.path.join(out, "comparison.md"), lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return results
