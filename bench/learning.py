"""Does it learn what the paper says? vae, vae-disl, gan and vaegan on real images, held-out scores.

    pip install -e ".[learning]" && python bench/learning.py --out bench/results/learning

Real images available offline: the 1,797 handwritten digits that ship inside scikit-learn (8x8,
16 grey levels; enlarged to 32x32 by the loader's order-3 spline), every 5th held out (360).
Each model trains with the authors' choices (RMSProp, their annealed learning rate, gamma 1e-6,
the equilibrium rule, weight decay, init) in a smaller configuration that is NOT the paper's, so
that the four runs fit about 30 minutes on 2 CPU cores: --width 0.25 (a quarter of the paper's
channels), 32x32 grayscale, latent 32, FC 256, batch 32, --steps (2,000). Over training it records,
on the held-out images: the reconstruction error Dec(mu(x)) in pixels (MSE on [-1, 1]) and in the
model's own Dis_l features, and the samples' KID and FID against them (Inception features; n beside
every score); and writes sample and held-out reconstruction grids, results.json, results.md, the
command and the versions. The paper's claims checked: VAE/GAN's samples score better than the
VAE's at equal budget, and VAE/GAN's held-out reconstructions improve over training.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import vaegan  # noqa: E402
from vaegan.data import build_dataset  # noqa: E402
from vaegan.eval import features as inception  # noqa: E402
from vaegan.eval.evaluate import real_batches, reconstruction_errors  # noqa: E402
from vaegan.eval.metrics import frechet_distance, gaussian_statistics, kernel_inception_distance  # noqa: E402
from vaegan.images import interleave, save_grid  # noqa: E402

MODELS = ("vae", "vae-disl", "gan", "vaegan")
SMALL = ["--image-size", "32", "--channels", "1", "--width", "0.25", "--latent-size", "32", "--fc-width", "256",
         "--batch-size", "32", "--workers", "0", "--device", "cpu", "--kernels", "torch"]
CHECKPOINTS = 8   # held-out reconstruction errors at 8 points of each run
KID_POINTS = 3    # sample scores (Inception: the slow part on a CPU) at 3 of them


def write_results(out, summary, table):
    """results.json (the summary) and results.md (its table) in `out`."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(f"wrote {out}/results.json and results.md", flush=True)


def write_digits(root):
    """scikit-learn's digits as PNGs: train/ (4 of every 5) and heldout/ (every 5th)."""
    from sklearn.datasets import load_digits
    digits = load_digits().images  # (1797, 8, 8), 0..16
    for split in ("train", "heldout"):
        os.makedirs(os.path.join(root, split), exist_ok=True)
    for i, image in enumerate(digits):
        split = "heldout" if i % 5 == 4 else "train"
        path = os.path.join(root, split, f"digit{i:04d}.png")
        if not os.path.exists(path):
            Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)).save(path)
    return os.path.join(root, "train"), os.path.join(root, "heldout")


def train(name, data, out, steps, gamma, extra, log, configuration=SMALL, checkpoints=CHECKPOINTS):
    """train.py on `data` with `configuration` and `extra` options (the model among them), keeping a
    checkpoint every steps // checkpoints; returns the seconds it took (None: an existing run reused)."""
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        log(f"{name}: {out} holds a run; reusing it (delete it to train again)")
        return None
    every = steps // checkpoints
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--data", data, "--steps", str(steps),
            "--gamma", str(gamma), "--keep-every", str(every), "--checkpoint-every", str(every),
            "--sample-every", str(max(1, steps // 4)), "--log-every", "50", "--out", out, *configuration, *extra]
    start = time.time()
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: training failed:\n{done.stderr[-3000:]}")
    log(f"{name}: trained {steps} steps in {time.time() - start:.0f} s")
    return time.time() - start


def heldout_curve(name, run, steps, heldout, log, scores=None, checkpoints=CHECKPOINTS, device="cpu"):
    """Held-out reconstruction errors (pixel MSE, Dis_l) of the run's kept checkpoints; `scores(k, model)`
    adds more to point k (1..checkpoints) as a dict. Returns the curve and the last model."""
    curve, every = [], steps // checkpoints
    for k in range(1, checkpoints + 1):
        step = k * every
        model = vaegan.load(os.path.join(run, f"checkpoint-{step:07d}.pt"), device)
        pixel, features = reconstruction_errors(model, heldout, len(heldout), 120, device)
        point = {"step": step, "heldout_pixel_mse": pixel, "heldout_dis_l_error": features, "n": len(heldout)}
        point.update(scores(k, model) if scores else {})
        curve.append(point)
        log(f"{name} step {step}: " + json.dumps({key: v for key, v in point.items() if key != "step"}))
    return curve, model


def laplacian_rms(images):
    """Mean over images of the RMS of the 4-neighbour Laplacian, in grey levels: sharpness."""
    x = (images.float().clamp(-1, 1) + 1) * 127.5
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.pow(2).mean(dim=(1, 2, 3)).sqrt().mean().item()


def sample_scores(model, network, real, real_sharpness, n, device="cpu", fid=True):
    """KID (one subset of all n: no spread to report), FID unless fid=False, and sharpness of n samples."""
    with torch.no_grad():
        samples = torch.cat([model.sample(min(100, n - s), seed=s) for s in range(0, n, 100)])
    fake = inception.inception_features(network, samples.split(100), n, device, desc="samples").numpy()
    scores = {"kid": kernel_inception_distance(real, fake, subset_size=n).mean,
              "sharpness_vs_heldout": laplacian_rms(samples) / real_sharpness, "n": n}
    if fid:
        scores["fid"] = frechet_distance(*gaussian_statistics(real), *gaussian_statistics(fake))
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/learning")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--gamma", type=float, default=1e-6, help="the decoder's L_llike weight (the authors': 1e-6)")
    parser.add_argument("--kid-samples", type=int, default=200, help="samples (and held-out images) per KID/FID")
    parser.add_argument("--train-args", default="", help="more train.py options for every run, e.g. '--no-equilibrium'")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", file=sys.stderr, flush=True)
    train_dir, heldout_dir = write_digits(os.path.join(args.out, "data"))
    heldout = build_dataset(heldout_dir, "train", 32, 1)  # a plain folder: all of it is the held-out set
    n_eval = min(args.kid_samples, len(heldout))
    network = inception.load_inception()
    real = inception.inception_features(network, real_batches(heldout, n_eval, 100), n_eval,
                                        desc="held-out images").numpy()
    everything = torch.stack([heldout[(i, False)][0] for i in range(len(heldout))])
    originals = everything[:16]
    real_sharpness = laplacian_rms(everything)
    results = {}

    def scores(k, model):
        point = {}
        if k % (CHECKPOINTS // KID_POINTS) == 0 or k == CHECKPOINTS:
            point["samples"] = sample_scores(model, network, real, real_sharpness, n_eval)
            if model.encoder is not None:
                with torch.no_grad():
                    point["reconstruction_sharpness_vs_heldout"] = laplacian_rms(model.reconstruct(everything)) / real_sharpness
        return point

    for name in args.models.split(","):
        run = os.path.join(args.out, "runs", name)
        train(name, train_dir, run, args.steps, args.gamma, ["--model", name, *args.train_args.split()], log)
        curve, model = heldout_curve(name, run, args.steps, heldout, log, scores)
        with torch.no_grad():
            save_grid(os.path.join(args.out, f"{name}-samples.png"), model.sample(32, seed=0))
            if model.encoder is not None:
                save_grid(os.path.join(args.out, f"{name}-heldout-reconstructions.png"),
                          interleave(originals, model.reconstruct(originals)))
        results[name] = curve
    mean_image_mse = float(((everything - everything.mean(0)) ** 2).mean())
    import triton
    summary = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "steps": args.steps,
               "gamma": args.gamma, "configuration": SMALL + args.train_args.split(), "data": "scikit-learn digits, every 5th held out",
               "heldout_images": len(heldout), "mean_image_pixel_mse": mean_image_mse, "results": results,
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "triton": triton.__version__, "machine": f"{os.cpu_count()} CPU cores, no GPU"},
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - started)}
    write_results(args.out, summary, markdown(summary))


def markdown(summary):
    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"
    lines = [f"Held-out scores over training ({summary['data']}; {summary['heldout_images']} held-out images; "
             f"mean-image pixel MSE {summary['mean_image_pixel_mse']:.4f}). Command: `{summary['command']}`; "
             f"{summary['versions']}; {summary['date']}.", "",
             "Sharpness: the Laplacian RMS of samples (or of the held-out images' reconstructions) over that of the "
             "held-out images (1: as sharp as the real digits).", "",
             "| model | step | held-out pixel MSE | held-out Dis_l error | reconstruction sharpness | KID (n) | FID (n) "
             "| sample sharpness |", "|---|---|---|---|---|---|---|---|"]
    for name, curve in summary["results"].items():
        for point in curve:
            scores = point.get("samples")
            kid = f"{scores['kid']:.4f} ({scores['n']})" if scores else ""
            fid = f"{scores['fid']:.1f} ({scores['n']})" if scores else ""
            sharp = f"{scores['sharpness_vs_heldout']:.2f}" if scores else ""
            recon_sharp = point.get("reconstruction_sharpness_vs_heldout")
            lines.append(f"| {name} | {point['step']} | {number(point['heldout_pixel_mse'], 4)} "
                         f"| {number(point['heldout_dis_l_error'], 2)} | {'' if recon_sharp is None else f'{recon_sharp:.2f}'} "
                         f"| {kid} | {fid} | {sharp} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
