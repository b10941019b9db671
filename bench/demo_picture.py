"""The demo's first picture: how much checkerboard the default `python train.py` leaves, and which
training choice puts it there.

    python bench/demo_picture.py --root /tmp/demo --variants base,fan-in,gamma1e-2 [--results FILE]
    python bench/demo_picture.py --measure RUN_DIR [--data spline3]

Each variant trains the built-in faces with `python train.py --seed 0 --out ROOT/VARIANT` plus one
change (an option, or a patch applied in the child process only: the transposed convolutions' init
fan, the faces' enlargement), then loads the saved model (`vaegan.load`) and measures, with batch
statistics as the grids are drawn (and the samples with running statistics too):

- checkerboard(): the share of an image's variation (mean removed) in the grids a stride-2 transposed
  convolution leaves: p2, repeating every 2 px (the Nyquist components (pi, pi), (pi, 0), (0, pi));
  p4, every 4 px (at 32 px: the first transposed convolution's checkerboard, on the decoder's 8x8
  base: the grid the demo showed); p4_band, p4's frequencies and their neighbours. The real training
  images give the reference.
- the reconstructions' mean squared pixel error on all 100 faces (images in [-1, 1]).
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NYQUIST_BAND = 2

# name: (extra command-line options, init patch, enlargement of the 25 px faces to the run's size)
VARIANTS = {
    "base": ([], None, "spline3"),
    "fan-in": ([], "fan-in", "spline3"),
    "bilinear": ([], None, "bilinear"),
    "pad": ([], None, "pad"),
    "gamma1e-2": (["--gamma", "1e-2"], None, "spline3"),
    "gamma1e-1": (["--gamma", "1e-1"], None, "spline3"),
    "gamma1e-4": (["--gamma", "1e-4"], None, "spline3"),
    "fp32": (["--precision", "fp32"], None, "spline3"),
    "nonsat": (["--decoder-gan-loss", "non-saturating"], None, "spline3"),
    "adam": (["--optimizer", "adam"], None, "spline3"),
    "lr2x": (["--lr", "7.8125e-4"], None, "spline3"),
    "steps300": (["--steps", "300"], None, "spline3"),
    "base-seed1": (["--seed", "1"], None, "spline3"),
    "fan-in-seed1": (["--seed", "1"], "fan-in", "spline3"),
}


def periodic_share(power, period, radius=0):
    """The share of `power` (N, C, H, W; DC zero) on the frequencies of a pattern that repeats every
    `period` pixels in both directions (multiples of H/period, W/period, DC excluded), and within
    Chebyshev distance `radius` of them (a pattern whose strength varies over the image)."""
    h, w = power.shape[-2:]

    def near(n):
        k = torch.arange(n)
        step = n // period
        offset = torch.minimum(k % step, step - k % step)  # distance to the nearest multiple of n/period
        low = torch.minimum(k, n - k)                       # distance to 0 (wrapping)
        return offset <= radius, low <= radius

    near_y, low_y = near(h)
    near_x, low_x = near(w)
    mask = near_y[:, None] & near_x[None, :] & ~(low_y[:, None] & low_x[None, :])
    total = power.sum((-2, -1)).clamp_min(1e-30)
    return ((power * mask).sum((-2, -1)) / total).mean().item()


def checkerboard(images):
    """(N, C, H, W) -> the share of each image's variation (its mean removed) in the grid patterns a
    stride-2 transposed convolution leaves, averaged over the batch:
    p2: repeating every 2 px (the (pi, pi), (pi, 0), (0, pi) Fourier components: the last transposed
    convolution's checkerboard); p4: every 4 px (p2 included; at 32 px the first transposed
    convolution's checkerboard, on the 8x8 grid of the decoder's base); p4_band: p4's frequencies and
    their neighbours (distance 1 of 32 bins, DC's excluded), for a grid whose strength varies."""
    x = images.detach().double()
    x = x - x.mean((-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2)
    return {"p2": periodic_share(power, 2), "p4": periodic_share(power, 4),
            "p4_band": periodic_share(power, 4, radius=1)}


def faces(enlargement, size=32):
    """The 100 built-in faces, float (100, 1, size, size) in [-1, 1], enlarged from 25 px by
    spline3 (the built-in data's: preprocess, order-3 spline), bilinear (order 1), or pad (none:
    the 25 px face in the middle, the border reflected)."""
    from skimage.data import lfw_subset
    from skimage import transform
    raw = lfw_subset()[:100]
    if enlargement == "spline3":
        from vaegan.data.datasets import _builtin_faces_spline3
        return torch.from_numpy(_builtin_faces_spline3(size, 1).images).permute(0, 3, 1, 2).float() / 127.5 - 1
    if enlargement == "bilinear":
        arrays = [transform.resize(f, (size, size), order=1, mode="reflect", anti_aliasing=False) for f in raw]
    elif enlargement == "pad":
        before = (size - raw.shape[1]) // 2
        after = size - raw.shape[1] - before
        arrays = [np.pad(f, ((before, after), (before, after)), mode="reflect") for f in raw]
    else:
        raise ValueError(enlargement)
    uint8 = (np.clip(np.stack(arrays), 0, 1) * 255).astype(np.uint8)
    return torch.from_numpy(uint8)[:, None].float() / 127.5 - 1


def patch(init, enlargement):
    """Apply a variant's patches in this (child) process."""
    import vaegan.data.datasets as datasets
    import vaegan.models as models
    datasets._builtin_faces_spline3 = datasets.builtin_faces
    if init == "fan-in":
        authors = models.init_weights

        def init_fan_in(module, *args):
            authors(module)
            for m in module.modules():
                if isinstance(m, torch.nn.ConvTranspose2d):  # fan = C_in*k*k (PyTorch's weight layout's dim 0)
                    fan = m.weight.shape[0] * m.weight[0, 0].numel()
                    bound = math.sqrt(3.0) / (3.0 * math.sqrt(fan))
                    torch.nn.init.uniform_(m.weight, -bound, bound)
        models.init_weights = init_fan_in
    if enlargement != "spline3":
        def builtin(image_size, channels):
            x = faces(enlargement, image_size)
            images = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            return datasets.InMemoryImages(images, datasets.BUILTIN)
        datasets.builtin_faces = builtin


def train_child(name, out):
    args, init, enlargement = VARIANTS[name]
    patch(init, enlargement)
    from vaegan.cli import train_command
    return train_command(["--seed", "0", "--out", out] + args, prog="train.py")


def measure(run_dir, enlargement="spline3"):
    import vaegan
    import vaegan.data.datasets as datasets
    datasets._builtin_faces_spline3 = datasets.builtin_faces
    model = vaegan.load(run_dir)
    real = faces(enlargement, model.image_size)
    with model.batch_statistics():
        samples = model.sample(64, seed=1).float()
        recon = torch.cat([model.reconstruct(real[:50]), model.reconstruct(real[50:])]).float()
    samples_eval = model.sample(64, seed=1).float()  # running statistics (vaegan.load's eval mode)
    result = {"real": checkerboard(real), "samples": checkerboard(samples), "recon": checkerboard(recon),
              "samples_eval": checkerboard(samples_eval), "pixel_mse": (recon - real).pow(2).mean().item()}
    return result


def table(rows):
    head = ("| variant | seconds | samples p2 | samples p4 | samples p4_band | recon p2 | recon p4 | recon p4_band "
            "| eval-mode samples p4 | real p2 | real p4 | real p4_band | recon pixel MSE |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows:
        s, c, e, q = r["samples"], r["recon"], r["samples_eval"], r["real"]
        lines.append(f"| {name} | {r.get('seconds', float('nan')):.0f} | {s['p2']:.4f} | {s['p4']:.4f} | "
                     f"{s['p4_band']:.4f} | {c['p2']:.4f} | {c['p4']:.4f} | {c['p4_band']:.4f} | {e['p4']:.4f} | "
                     f"{q['p2']:.4f} | {q['p4']:.4f} | {q['p4_band']:.4f} | {r['pixel_mse']:.4f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/demo-picture")
    parser.add_argument("--variants", default="base,fan-in,bilinear,gamma1e-2,gamma1e-4,fp32")
    parser.add_argument("--results", default=None, help="JSON lines file to append each variant's measurement to")
    parser.add_argument("--measure", default=None, metavar="RUN_DIR")
    parser.add_argument("--data", default="spline3", help="with --measure: the enlargement the run trained on")
    parser.add_argument("--train-child", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_child:
        return train_child(*args.train_child)
    if args.measure:
        print(json.dumps(measure(args.measure, args.data), indent=1))
        return 0
    rows = []
    for name in args.variants.split(","):
        out = os.path.join(args.root, name)
        start = time.time()
        if not os.path.exists(os.path.join(out, "checkpoint.pt")):
            subprocess.run([sys.executable, os.path.abspath(__file__), "--train-child", name, out], check=True,
                           cwd=ROOT, stdout=subprocess.DEVNULL)
        result = measure(out, VARIANTS[name][2])
        result.update(variant=name, seconds=time.time() - start, command=VARIANTS[name][0])
        rows.append((name, result))
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")
        print(table(rows[-1:]), flush=True)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
