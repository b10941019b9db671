"""How often does the VAE/GAN's decoder collapse at small batches? Several seeds of several settings, learning curves each.

    python bench/collapse.py --out bench/results/collapse-20261205

Real images available offline: scikit-learn's 1,797 digits (bench/learning.py's split: every 5th
held out), 32x32 grey, at batch 16 in the networks of the issue's report (the defaults: --networks paper) or
bench/learning.py's small ones (--networks small: --width 0.25, latent 32, FC 256), every other option at its
default (the authors' RMSProp, annealed learning rate, equilibrium rule, gamma 1e-5 at 32 px since 2026-12-05
(the `defaults` rows of the results dated 20261205 ran at the earlier 1e-6: `gamma1e-6` now); bf16 where the CPU
has it). Each setting ("variant") changes one thing. Per
run it records, every 100 steps, the held-out reconstruction error Dec(mu(x)) over the held-out
mean image's (1.0: no better than the mean image; the model as a checkpoint holds it: running
BatchNorm statistics), and from metrics.jsonl the trainer's own check (vaegan/collapse.py, every 50
steps, on a fixed batch of the training images) and the collapse lines it printed. Runs are
subprocesses of train.py, `--jobs` at a time, one thread each; a run whose curve exists is reused.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vaegan  # noqa: E402
from learning import write_digits, write_results  # noqa: E402
from vaegan.collapse import COLLAPSED_ERROR  # noqa: E402
from vaegan.data import build_dataset  # noqa: E402

COMMON = ["--image-size", "32", "--channels", "1", "--workers", "0", "--device", "cpu", "--kernels", "torch"]
# "paper": the networks at their default (paper) widths, as the report ran them (30M parameters at
# 32 px, about 1 s a step on one core); "small": bench/learning.py's (about 0.25 s a step)
NETWORKS = {"paper": [], "small": ["--width", "0.25", "--latent-size", "32", "--fc-width", "256"]}
# One change each from the defaults (name: options added).
VARIANTS = {
    "defaults": [],
    "fp32": ["--precision", "fp32"],
    "gamma1e-5": ["--gamma", "1e-5"],
    "gamma1e-6": ["--gamma", "1e-6"],  # the 32 px default before it became the authors' 32 px value, 1e-5
    "batch64": ["--batch-size", "64"],
    "gan-loss-eps": ["--gan-loss-form", "eps"],
    "no-equilibrium": ["--no-equilibrium"],
    "non-saturating": ["--decoder-gan-loss", "non-saturating"],
    "latent128": ["--latent-size", "128", "--fc-width", "1024"],  # the defaults' latent and FC in narrow convolutions
}
EVAL_EVERY = 100
CHECK_EVERY = 50


def digits(directory):
    """(the training split's folder, the held-out images as one (N, 1, 32, 32) tensor) of the digits written there."""
    train_dir, heldout_dir = write_digits(directory)
    heldout = build_dataset(heldout_dir, "train", 32, 1)
    return train_dir, torch.stack([heldout[(i, False)][0] for i in range(len(heldout))])


def train(run, data, seed, steps, batch, extra, schedule_steps=None):
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--data", data, "--steps", str(steps), "--seed", str(seed),
            "--lr-schedule-steps", str(schedule_steps or steps),
            "--batch-size", str(batch), "--keep-every", str(EVAL_EVERY), "--checkpoint-minutes", "0",
            "--collapse-check-every", str(CHECK_EVERY), "--log-every", "10", "--sample-every", str(steps),
            "--out", run, *COMMON, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{run}: training failed:\n{done.stderr[-3000:]}")
    return [line for line in done.stderr.replace("\r", "\n").splitlines() if "collapsed" in line]


@torch.no_grad()
def heldout_measures(checkpoint, images):
    """(error, reconstructions' spread, samples' spread) of a checkpoint: Dec(mu(x))'s pixel MSE over the held-out
    mean image's; the per-pixel standard deviation across the reconstructions, and across 64 samples Dec(z_p),
    over the held-out images' own (near 0: one image whatever the input, the decoder collapsed to a point)."""
    model = vaegan.load(checkpoint)
    spread = (images - images.mean(0)).pow(2).mean()
    recon = model.reconstruct(images).float()
    samples = model.sample(64, seed=0).float()
    own = images.std(0).mean()
    return (float((recon - images).pow(2).mean() / spread), float(recon.std(0).mean() / own),
            float(samples.std(0).mean() / own))


def statistics_path_share(model, images, batch, draws=8):
    """How much of the decoder's minimax gradient at its samples comes through the discriminator's shared
    BatchNorm statistics: the gradient of the real images' term, -log Dis(x) (which reaches the samples
    only through the statistics of the batch [x, samples]), over that of the samples' own term
    -log(1 - Dis(x_p)), by norm, median over `draws` batches of `batch` reals and `batch` samples (the
    discriminator in training mode, its running statistics left as they were)."""
    from vaegan.gradients import extra_pass
    generator = torch.Generator().manual_seed(0)
    model.train()
    ratios = []
    for _ in range(draws):
        x = images[torch.randperm(len(images), generator=generator)[:batch]]
        with torch.no_grad():
            fakes = extra_pass(model.decoder, torch.randn(batch, model.latent_size, generator=generator))
        fakes.requires_grad_(True)
        logits = extra_pass(model.discriminator, torch.cat([x, fakes]))
        real_term = torch.nn.functional.softplus(-logits[:batch]).mean()
        fake_term = torch.nn.functional.softplus(logits[batch:]).mean()
        g_real, = torch.autograd.grad(real_term, fakes, retain_graph=True)
        g_fake, = torch.autograd.grad(fake_term, fakes)
        ratios.append(float(g_real.norm() / g_fake.norm()))
    model.eval()
    return sorted(ratios)[len(ratios) // 2]


def one_run(name, seed, args, data, images, log):
    run = os.path.join(args.work, f"{args.networks}-{name}-seed{seed}")
    curve_path = os.path.join(run, "curve.json")
    if os.path.exists(curve_path):
        with open(curve_path) as f:
            result = json.load(f)
        if "statistics_path_share" not in result:  # a curve recorded before the measure existed
            final = vaegan.load(run)
            result["statistics_path_share"] = {str(b): statistics_path_share(final, images, b) for b in (16, 64)}
            with open(curve_path, "w") as f:
                json.dump(result, f)
        return result
    if os.path.exists(run):
        raise SystemExit(f"{run} holds an unfinished run: delete it to train again")
    start = time.time()
    # a variant's options come last: they win
    lines = train(run, data, seed, args.steps, args.batch, NETWORKS[args.networks] + VARIANTS[name], args.schedule_steps)
    heldout, recon_spread, sample_spread = {}, {}, {}
    for step in range(EVAL_EVERY, args.steps + 1, EVAL_EVERY):
        path = os.path.join(run, f"checkpoint-{step:07d}.pt")
        heldout[step], recon_spread[step], sample_spread[step] = heldout_measures(path, images)
        os.remove(path)  # the curve is what is kept
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    result = {"variant": name, "seed": seed, "seconds": round(time.time() - start),
              "heldout": heldout, "recon_spread": recon_spread, "sample_spread": sample_spread,
              "check": {r["step"]: r["recon_check"] for r in rows if "recon_check" in r},
              "train_pixel_error": {r["step"]: r["pixel_error"] for r in rows if r["step"] % CHECK_EVERY == 0},
              "dis_loss": {r["step"]: r["dis_loss"] for r in rows if r["step"] % CHECK_EVERY == 0},
              "collapse_lines": lines}
    final = vaegan.load(run)
    result["statistics_path_share"] = {str(b): statistics_path_share(final, images, b) for b in (16, 64)}
    with open(curve_path, "w") as f:
        json.dump(result, f)
    log(f"{name} seed {seed}: {result['seconds']} s; held-out " +
        " ".join(f"{v:.2f}" for v in heldout.values()) + (f"; {lines[0]}" if lines else ""))
    return result


def summarise(results, steps):
    """Per variant: the final held-out errors, their best, and which seeds ended collapsed (final error
    above 1, the mean image's, and over twice the seed's best)."""
    table = {}
    for r in results:
        curve = [r["heldout"][k] for k in sorted(r["heldout"], key=int)]
        row = table.setdefault(r["variant"], {"final": [], "best": [], "collapsed_seeds": [], "reported_seeds": []})
        row["final"].append(curve[-1])
        row["best"].append(min(curve))
        if curve[-1] > COLLAPSED_ERROR and curve[-1] > 2 * min(curve):
            row["collapsed_seeds"].append(r["seed"])
        if r["collapse_lines"]:
            row["reported_seeds"].append(r["seed"])
    return table


def markdown(summary):
    lines = [f"Collapse at small batches: {summary['data']}; {summary['configuration']}; {summary['steps']} steps"
             f" (the learning rate annealed over {summary.get('schedule_steps', summary['steps'])}). "
             f"Command: `{summary['command']}`; {summary['versions']}; {summary['date']}.", "",
             "Held-out reconstruction error = pixel MSE of Dec(mu(x)) over the held-out mean image's (1.0: no better "
             "than the mean image), the model as a checkpoint holds it. A run counts as collapsed at the end when "
             "its final error is above 1 and over twice its own best.", "",
             "| variant | seeds | final error per seed | median final | collapsed at the end | trainer reported a collapse |",
             "|---|---|---|---|---|---|"]
    for name, row in summary["summary"].items():
        finals = sorted(row["final"])
        median = finals[len(finals) // 2]
        lines.append(f"| {name} | {len(finals)} | {' '.join(f'{v:.2f}' for v in row['final'])} | {median:.2f} "
                     f"| {len(row['collapsed_seeds'])} {row['collapsed_seeds']} "
                     f"| {len(row['reported_seeds'])} {row['reported_seeds']} |")
    lines += ["", "Statistics path share: the norm of the gradient that the real images' term -log Dis(x) sends to the "
              "decoder's samples through the discriminator's BatchNorm statistics of the batch [x, samples], over that "
              "of the samples' own term -log(1 - Dis(x_p)), at the run's final weights (median of 8 batches; "
              "`statistics_path_share` in bench/collapse.py).", ""]
    lines += ["", "Curves: the held-out error every 100 steps (with, where recorded, the spread of the held-out "
              "reconstructions and of 64 samples: the per-pixel standard deviation across them over the held-out "
              "images' own; near 0, the decoder gives one image whatever its input); the trainer's check (the same "
              "measure on 64 training images) every 50; and, at the check steps, the training step's own pixel MSE (`pixel_error`: training "
              "batch, batch statistics, absolute: the held-out mean image's is "
              f"{summary['heldout_mean_image_pixel_mse']:.4f}) and the discriminator's loss.", ""]
    for r in summary["runs"]:
        lines.append(f"- {r['variant']} seed {r['seed']}: held-out "
                     + " ".join(f"{k}:{v:.2f}" for k, v in r["heldout"].items())
                     + ("; spread of the reconstructions " + " ".join(f"{v:.2f}" for v in r["recon_spread"].values())
                        + ", of the samples " + " ".join(f"{v:.2f}" for v in r["sample_spread"].values())
                        if "recon_spread" in r else "")
                     + "; check " + " ".join(f"{v:.2f}" for v in r["check"].values())
                     + "; pixel_error " + " ".join(f"{v:.2f}" for v in r["train_pixel_error"].values())
                     + "; dis_loss " + " ".join(f"{v:.2f}" for v in r["dis_loss"].values())
                     + "; statistics path share at batch 16 / 64: "
                     + " / ".join(f"{v:.2f}" for v in r["statistics_path_share"].values())
                     + (f"; reported: `{r['collapse_lines'][0].strip()}`" if r["collapse_lines"] else ""))
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/collapse-20261205")
    parser.add_argument("--work", default=None, help="where the runs go (default: OUT/runs)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--schedule-steps", type=int, default=None,
                        help="the steps the learning rate's annealing spans (default: --steps); a run shorter than "
                        "another replays its first steps exactly when both give the same")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--networks", choices=tuple(NETWORKS), default="small")
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--variants", default="defaults", help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--variant-seeds", action="append", default=[], metavar="VARIANT=SEEDS",
                        help="other seeds for one variant, e.g. latent128=0,1,2 (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    args = parser.parse_args()
    args.work = args.work or os.path.join(args.out, "runs")
    os.makedirs(args.work, exist_ok=True)
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", file=sys.stderr, flush=True)
    train_dir, images = digits(os.path.join(args.out, "data"))
    seeds = {name: args.seeds for name in args.variants.split(",")}
    seeds.update(dict(item.split("=", 1) for item in args.variant_seeds))
    jobs = [(name, int(seed)) for name in args.variants.split(",") for seed in seeds[name].split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: one_run(*job, args, train_dir, images, log), jobs))
    import triton
    summary = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "steps": args.steps,
               "schedule_steps": args.schedule_steps or args.steps,
               "data": "scikit-learn digits, every 5th held out", "heldout_images": len(images),
               "heldout_mean_image_pixel_mse": float((images - images.mean(0)).pow(2).mean()),
               "configuration": f"batch {args.batch}, {args.networks} networks: " + " ".join(COMMON + NETWORKS[args.networks]), "variants": VARIANTS,
               "summary": summarise(results, args.steps), "runs": results,
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "triton": triton.__version__, "machine": f"{os.cpu_count()} CPU cores, no GPU"},
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - started)}
    write_results(args.out, summary, markdown(summary))


if __name__ == "__main__":
    main()
