"""Where one training step spends its time, on record: `python bench/profile_step.py --batches 64,512 --out DIR`.

For each batch, after warm-up, each variant is timed over --steps steps between two CUDA events
(timing.StepClock: one synchronisation at the end) and then run --profile-steps steps under
torch.profiler. The variants are our fastest mode (bf16, torch.compile with CUDA graphs,
channels-last) and the fair eager mode (bf16, channels-last, foreach RMSprop, no compile), each
with the fused Triton losses ("triton") and with the reference losses ("torch") (bench/baseline.py):
what the fused kernels buy inside a compiled step and in eager mode.

Written per batch: PREFIX-bBATCH.md and PREFIX-bBATCH.json (PREFIX: --prefix, default DIR/profile):
img/s of each variant, and for each the kernel table by CUDA time per step, its top kernels with
their share, and the time grouped into convolutions, matmul/GEMM, elementwise/fused Triton, our
fused losses, normalisation, optimizer, and copies/other. A kernel launched by an eager aten op is
grouped by that op (aten::cudnn_convolution, aten::mm, ...); one seen without its op, as inside compiled
code and CUDA graphs, by the op that launched the same kernel in an eager variant of this run (the fair
mode runs cuDNN's and cuBLAS's kernels eagerly), else by its name (kernel_group): that naming is the part
to check against a GPU's tables. The files are rewritten after each variant, so a run stopped by a time
limit keeps what it measured (and says which variants are missing).

On a CPU the same script runs at tiny sizes with CPU time per op (self time) in place of kernels,
the reference losses only by default (the Triton interpreter would time Python), and the "aot_eager"
backend: a smoke test (tests/test_bench_method.py calls `main`), its figures mean nothing.
"""
import argparse
import collections
import datetime
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# run as a script, bench/ is sys.path[0]; the repository (vaegan, kernels) goes last, if missing
for _path in (HERE, os.path.dirname(HERE)):
    if _path not in sys.path:
        sys.path.append(_path)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is imported

from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import baseline  # noqa: E402
from timing import CUDA, StepClock, compile_counters, free_device_memory, memory_peaks, memory_window, sync  # noqa: E402

GROUPS = ("convolution", "matmul / GEMM", "elementwise / fused Triton", "fused losses (kernels/)", "normalisation",
          "optimizer", "copies / other")

# By the aten op that launched a kernel (eager code): the surest sign of what the kernel does.
_BY_OP = [
    ("convolution", re.compile(r"convolution|conv\d?d|cudnn_conv|mkldnn_conv", re.I)),
    ("matmul / GEMM", re.compile(r"aten::(add|b|addb|_scaled_)?mm\b|aten::linear|aten::matmul|aten::baddbmm", re.I)),
    ("normalisation", re.compile(r"batch_norm|layer_norm|group_norm", re.I)),
    ("optimizer", re.compile(r"_foreach_|optimizer|rmsprop", re.I)),
]
# By the kernel's (or on a CPU the op's) own name, first match wins.
_BY_NAME = [
    ("optimizer", re.compile(r"foreach|multi_tensor|rmsprop|adam|optimizer|^triton_for_", re.I)),
    ("fused losses (kernels/)", re.compile(r"_gan_loss_(forward|backward)|_feature_nll_(forward|backward)"
                                           r"|_reparam_kl_(forward|backward)")),
    ("matmul / GEMM", re.compile(r"^triton_tem_.*mm", re.I)),
    ("convolution", re.compile(r"^triton_tem_.*conv", re.I)),
    ("elementwise / fused Triton", re.compile(r"^triton_", re.I)),
    ("normalisation", re.compile(r"batch_?norm|bn_fw|bn_bw|layer_?norm|group_?norm|welford", re.I)),
    # cuDNN's convolution kernels: implicit GEMMs, fprop/dgrad/wgrad, Winograd, FFT
    ("convolution", re.compile(r"conv(?!ert)|cudnn|implicit_gemm|fprop|dgrad|wgrad|winograd|fft|mkldnn", re.I)),
    # cuBLAS(Lt)/CUTLASS GEMMs: sm90_xmma_gemm_*, nvjet_*, *gemm*, ampere_*s16816gemm*
    ("matmul / GEMM", re.compile(r"gemm|gemv|nvjet|cublas|cutlass|xmma|matmul|s16816|s1688|aten::(add|b)?mm\b", re.I)),
    ("copies / other", re.compile(r"copy|memcpy|memset|nchwtonhwc|nhwctonchw|transpose|aten::cat\b|clone|contiguous",
                                  re.I)),
    ("elementwise / fused Triton", re.compile(
        r"elementwise|vectorized|unrolled|reduce_kernel|pointwise|index|distribution|philox"
        r"|aten::(add|sub|mul|div|sqrt|rsqrt|exp|log|pow|neg|abs|relu|threshold|sigmoid|tanh|softplus|where|clamp"
        r"|fill|zero|sum|mean|lerp|addcmul|addcdiv|maximum|minimum|lt|gt|le|ge|eq|ne|logical|bitwise|rand|normal"
        r"|bernoulli|mse|bitwise|isfinite|all|any|full|ones|zeros|empty_like|reciprocal|square)", re.I)),
]


def op_group(launcher):
    """The group an aten op names (aten::cudnn_convolution: convolution), or None (a wrapper such as a compiled
    region or CUDA-graph replay names none)."""
    for group, pattern in _BY_OP:
        if launcher and pattern.search(launcher):
            return group
    return None


def kernel_group(name, launcher=None):
    """The group of a kernel (or, on a CPU, an op) by the aten op that launched it when known, else by its name."""
    group = op_group(launcher)
    if group:
        return group
    for group, pattern in _BY_NAME:
        if pattern.search(name):
            return group
    return "copies / other"


def kernel_row(name, launched_by, calls_per_step, us_per_step):
    """One row of the kernel table, with its group and what the group was taken from."""
    by_op = op_group(launched_by)
    return {"name": name, "group": by_op or kernel_group(name), "launched_by": launched_by,
            "grouped_by": "launching op" if by_op else "name", "calls_per_step": calls_per_step,
            "us_per_step": us_per_step}


def kernel_rows(prof, steps):
    """[{name, group, launched_by, calls_per_step, us_per_step}], largest first: CUDA kernels (and copies,
    memsets) by device time on CUDA; on a CPU, ops by self CPU time. Per step: the totals over `steps`."""
    if CUDA:
        totals, calls = collections.Counter(), collections.Counter()
        launchers = collections.defaultdict(collections.Counter)
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                totals[event.name] += event.time_range.elapsed_us()
                calls[event.name] += 1
            elif event.device_type == DeviceType.CPU:
                for kernel in event.kernels:
                    launchers[kernel.name][event.name] += 1
        rows = []
        for name, us in totals.items():
            launched_by = launchers[name].most_common(1)[0][0] if launchers[name] else None
            rows.append(kernel_row(name, launched_by, calls[name] / steps, us / steps))
    else:
        rows = [kernel_row(e.key, None, e.count / steps, e.self_cpu_time_total / steps)
                for e in prof.key_averages() if e.self_cpu_time_total > 0]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def regroup(variants, top):
    """A kernel seen without an aten op that names its group (inside CUDA graphs and compiled code: no op, or a
    wrapper such as a compiled region) takes the group of the same kernel where an eager op launched it in this
    run (cuDNN's convolutions and cuBLAS's GEMMs share names such as sm90_xmma_gemm_*); each variant's summary
    is then made again."""
    by_launch = {r["name"]: r["group"] for v in variants.values() for r in v["profile_rows"]
                 if r["grouped_by"] == "launching op"}
    for v in variants.values():
        for r in v["profile_rows"]:
            if r["grouped_by"] != "launching op" and r["name"] in by_launch:
                r["group"], r["grouped_by"] = by_launch[r["name"]], "the same kernel's launching op in this run"
        v["profile"] = summarise(v["profile_rows"], v["seconds_per_step"], top)


def summarise(rows, seconds_per_step, top):
    total = sum(r["us_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["us_per_step"] / total if total else 0.0
    groups = {g: {"us_per_step": 0.0, "kernels": 0} for g in GROUPS}
    for r in rows:
        groups[r["group"]]["us_per_step"] += r["us_per_step"]
        groups[r["group"]]["kernels"] += 1
    for g in groups.values():
        g["share"] = g["us_per_step"] / total if total else 0.0
    return {"time": "CUDA kernel time" if CUDA else "CPU self time per op", "total_us_per_step": total,
            # the device busy with kernels over the event-timed step: below 1, idle gaps (or kernels the
            # profiler did not see)
            "coverage_of_step": total / (seconds_per_step * 1e6), "groups": groups, "top": rows[:top],
            "distinct_names": len(rows)}


def run_variant(mode, kernels, batch, args):
    """Time then profile one variant; returns its figures."""
    free_device_memory()
    start_bytes = memory_window()
    before = compile_counters()
    step, model, info = baseline.build(mode, batch, kernels=kernels, width=args.width)
    for _ in range(args.warmup):
        step()
    sync()
    seconds = StepClock(step, args.steps).run()
    memory = memory_peaks()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        sync()
    compiled = {name: value - before[name] for name, value in compile_counters().items()}
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    del step, model
    fell_back = compiled["recompile_limit_hits"] > 0 or compiled["cudagraph_skips"] > 0 or (
        info["compile"] and compiled["unique_graphs"] == 0)
    return {**info, "batch": batch, "seconds_per_step": seconds, "img_per_s": batch / seconds,
            "steps_timed": args.steps, "warmup_steps": args.warmup, "profiled_steps": args.profile_steps,
            "memory_at_start_bytes": start_bytes, **memory, **compiled, "fell_back": fell_back,
            "parameters_finite": finite,
            "profile_rows": kernel_rows(prof, args.profile_steps)}


def environment(argv):
    import triton
    return {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python bench/profile_step.py " + " ".join(argv),
            "sizes": {"image_size": baseline.SIZE, "channels": baseline.CHANNELS, "latent": baseline.LATENT,
                      "fc_width": baseline.FC}}


def launched(row):
    note = " (grouped as an eager op launched it)" if row["grouped_by"].startswith("the same") else ""
    return (row["launched_by"] or "-") + note


def fmt_name(name, width=110):
    name = name.replace("|", "\\|")
    return name if len(name) <= width else name[:width - 3] + "..."


def markdown(report):
    env, variants = report["environment"], report["variants"]
    unit = "CUDA time" if CUDA else "CPU self time"
    lines = [f"# One training step at batch {report['batch']}: where the time goes", "",
             f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}, {env['date']}; "
             f"`{env['command']}`.", "",
             f"Each variant timed over {report['steps']} steps "
             + ("between two CUDA events" if CUDA else "by the wall clock")
             + f" after {report['warmup']} warm-up steps (one synchronisation at the end), "
             f"then {report['profile_steps']} steps profiled "
             "(torch.profiler). `fair` is eager bf16, channels-last, foreach RMSprop; `fastest` adds torch.compile "
             "with CUDA graphs. `+triton`: the fused losses; `+torch`: the reference losses.", ""]
    if not CUDA:
        lines += ["**On a CPU at tiny sizes: the figures only show that the script runs.**", ""]
    missing = [name for name in report.get("planned", ()) if name not in variants]
    if missing:
        lines += [f"**Incomplete: not measured (the run stopped first): {', '.join(missing)}.**", ""]
    lines += ["| variant | img/s | ms/step | vs fair+torch | peak allocated | peak reserved | "
              f"{unit}/step | busy / step | fell back |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    ref = variants.get("fair+torch")

    def gib(b):
        return f"{b / 2 ** 30:.2f} GiB" if b is not None else "-"
    for name, v in variants.items():
        lines.append(f"| {name} | {v['img_per_s']:,.1f} | {v['seconds_per_step'] * 1e3:.2f} | "
                     + (f"{v['img_per_s'] / ref['img_per_s']:.2f}x" if ref else "-")
                     + f" | {gib(v['peak_memory_allocated_bytes'])} | {gib(v['peak_memory_reserved_bytes'])} | "
                     f"{v['profile']['total_us_per_step'] / 1e3:.2f} ms | {v['profile']['coverage_of_step']:.0%} | "
                     f"{'YES' if v['fell_back'] else 'no'} |")
    for a, b, what in (("fastest+torch", "fastest+triton", "inside the compiled step"),
                       ("fair+torch", "fair+triton", "in eager mode")):
        if a in variants and b in variants:
            lines.append(f"\nThe fused losses {what}: {variants[b]['img_per_s'] / variants[a]['img_per_s']:.2f}x "
                         f"({variants[a]['img_per_s']:,.0f} -> {variants[b]['img_per_s']:,.0f} img/s).")
    lines += ["", f"## {unit} per step by group", "", "| group | " + " | ".join(variants) + " |",
              "| --- |" + " ---: |" * len(variants)]
    for group in GROUPS:
        cells = [f"{v['profile']['groups'][group]['share']:.1%} ({v['profile']['groups'][group]['us_per_step'] / 1e3:.2f} ms)"
                 for v in variants.values()]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    for name, v in variants.items():
        p = v["profile"]
        lines += ["", f"## {name}: top {len(p['top'])} of {p['distinct_names']} by {unit}", "",
                  "| share | us/step | calls/step | group | name | launched by |", "| ---: | ---: | ---: | --- | --- | --- |"]
        for r in p["top"]:
            lines.append(f"| {r['share']:.1%} | {r['us_per_step']:,.1f} | {r['calls_per_step']:g} | {r['group']} | "
                         f"`{fmt_name(r['name'])}` | {launched(r)} |")
    return "\n".join(lines) + "\n"


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="64,512" if CUDA else "2")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--prefix", default="profile", help="file names: OUT/PREFIX-bBATCH.{md,json}")
    parser.add_argument("--modes", default="fair,fastest",
                        help="of fair, fastest (fair first: eager and quick, it names the kernels for the compiled)")
    parser.add_argument("--kernels", default="triton,torch" if CUDA else "torch",
                        help="of triton, torch (on a CPU triton runs in the interpreter)")
    parser.add_argument("--steps", type=int, default=50 if CUDA else 2, help="event-timed steps per variant")
    parser.add_argument("--warmup", type=int, default=15 if CUDA else 2)
    parser.add_argument("--profile-steps", type=int, default=5 if CUDA else 1)
    parser.add_argument("--top", type=int, default=25, help="kernels listed per variant")
    parser.add_argument("--width", type=float, default=baseline.WIDTH if CUDA else 0.25,
                        help="channel-width multiplier (default: the paper's on CUDA, a quarter on a CPU)")
    return parser.parse_args(argv)


def write(path, report):
    """PATH.json and PATH.md, each replaced whole (written aside, then renamed)."""
    for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", markdown(report))):
        with open(path + suffix + ".part", "w") as f:
            f.write(text)
        os.replace(path + suffix + ".part", path + suffix)


def main(argv=None):
    """Profile every batch; returns {batch: report} and writes OUT/PREFIX-bBATCH.{md,json}."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # a compiled variant never silently runs eager
    os.makedirs(args.out, exist_ok=True)
    env = environment(argv)
    reports = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        variants = {}
        planned = [f"{mode}+{kernels}" for mode in args.modes.split(",") for kernels in args.kernels.split(",")]
        report = {"batch": batch, "steps": args.steps, "warmup": args.warmup, "profile_steps": args.profile_steps,
                  "environment": env, "planned": planned, "variants": variants}
        path = os.path.join(args.out, f"{args.prefix}-b{batch}")
        for mode in args.modes.split(","):
            for kernels in args.kernels.split(","):
                name = f"{mode}+{kernels}"
                variants[name] = run_variant(mode, kernels, batch, args)
                regroup(variants, args.top)
                print(f"batch {batch} {name}: {variants[name]['img_per_s']:,.1f} img/s "
                      f"({variants[name]['seconds_per_step'] * 1e3:.2f} ms/step)", flush=True)
                write(path, report)  # after each variant: a stage stopped by its time limit keeps what it measured
        print(f"wrote {path}.md and .json", flush=True)
        reports[batch] = report
    return reports


if __name__ == "__main__":
    main()
