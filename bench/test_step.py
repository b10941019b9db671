"""The whole training step in images per second, measured once per mode and batch in one run.

Modes (bench/baseline.py): `port` (the port-style baseline, a different function), `fair` (our
routed update in eager bf16, channels-last, foreach RMSprop, reference losses: the baseline a
speed-up should be claimed against), `eager` (our eager fp32 step with the fused losses, as
benchmarked before), `fastest` (bf16, torch.compile with CUDA graphs, fused Triton losses,
channels-last).

Goals on one H200: the fastest step >= 2x `fair` at batch 64, and >= 25,000 img/s at batch 512.

The method:
  * throughput, not latency: each mode runs STEPS steps between two CUDA events with nothing
    synchronising in between and one synchronisation at the end (timing.StepClock; on a CPU the
    wall clock over the same steps), after WARMUP steps. pytest-benchmark times the same stretch
    (`benchmark.pedantic(clock, rounds=1, iterations=STEPS)`): its per-iteration figure is the
    stretch's wall time over STEPS; `img_per_s` in extra_info is the event-timed figure;
  * `torch.backends.cudnn.benchmark = True` in every mode, the port-style baseline's too;
  * one figure per mode and batch: a mode's row reports its own img/s, and the ratios
    (`speedup_vs_fair`, `speedup_vs_port`) use the figures those rows measured in this run. Rows run
    port, fair, eager, fastest for each batch: the port row has no `speedup_vs_fair` (fair is measured
    after it). A reference whose row is not selected (`-k fastest`) is measured without a row, once;
  * peak memory includes compilation and the CUDA-graph pools: dynamo's caches and the allocator's
    cache are emptied and the peak statistics reset before the step is built and warmed up;
    `peak_memory_allocated_bytes` and `peak_memory_reserved_bytes`, with `memory_at_start_bytes`;
  * MFU two ways: useful FLOPs (our routed step's, counted by torch's FlopCounterMode: one forward,
    one backward, three optimizer steps) per second over the datasheet's dense bf16 peak
    (`mfu_datasheet`), and over what a bf16 8192^3 matrix product reaches on this device in the same
    run (`mfu_reachable`, timing.reachable_flops);
  * compiled figures did not fall back: no recompile-limit hit, no CUDA-graph skip.
On a machine without CUDA the tests run at tiny sizes, only to show that they run and report.
"""
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from baseline import MODES, SIZE, build
from timing import (CUDA, StepClock, compile_counters, device_peak, free_device_memory, memory_peaks, memory_window,
                    reachable_flops, record, sync)

# VAEGAN_BENCH_BATCHES=64 times one batch size (bench/run_gpu.sh runs one per stage)
BATCHES = [int(b) for b in os.environ.get("VAEGAN_BENCH_BATCHES", "64,256,512").split(",")] if CUDA else [4]
STEPS = int(os.environ.get("VAEGAN_BENCH_STEPS", 50 if CUDA else 2))
WARMUP = 15 if CUDA else 1  # CUDA-graph trees record on their second warm-up call; cudnn autotunes on the first
# Dense bf16 tensor-core peaks on the datasheets (FLOP/s): H100 SXM and H200 989.4 TFLOP/s.
PEAK = {"H100": 989.4e12, "H200": 989.4e12}
ROWS = [(mode, batch) for batch in BATCHES for mode in MODES]  # this order: each batch's references first

_figures, _routed_flops = {}, {}


def counted_flops(step):
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def routed_flops_per_image(batch):
    """The useful work: FLOPs of our eager routed step (one forward, one backward, three optimizer
    steps), the same whatever the precision or layout. Counted, not timed."""
    if batch not in _routed_flops:
        step, _, _ = build("eager", batch, kernels="torch")
        step()  # optimizer state exists before counting
        _routed_flops[batch] = counted_flops(step) / batch
    return _routed_flops[batch]


def measure(mode, batch, benchmark=None, levers=None):
    """The figures of one mode at one batch (with other TrainConfig values: `levers`), timed once (in
    `benchmark` when given)."""
    free_device_memory()
    start_bytes = memory_window()  # compilation, cudnn's autotuning and CUDA-graph recording fall inside
    before = compile_counters()
    step, model, info = build(mode, batch, levers=levers)
    for _ in range(WARMUP + (1 if mode == "fastest" and not CUDA else 0)):
        step()
    sync()
    clock = StepClock(step, STEPS)
    if benchmark is not None:
        benchmark.pedantic(clock, rounds=1, iterations=STEPS, warmup_rounds=0)
    clock.run()  # (the remaining steps, if any: --benchmark-disable calls the target once)
    seconds = clock.seconds_per_step
    memory = memory_peaks()
    compiled = {name: value - before[name] for name, value in compile_counters().items()}
    # the figure is the mode it names: nothing fell back to eager, no CUDA graph was skipped
    assert compiled["recompile_limit_hits"] == 0 and compiled["cudagraph_skips"] == 0, (mode, compiled)
    if mode == "fastest":
        assert compiled["unique_graphs"] > 0, compiled
    assert all(torch.isfinite(p).all() for p in model.parameters()), mode
    mode_flops = None if mode == "fastest" else counted_flops(step) / batch  # (compiled code hides its ops)
    del step, model
    return {**info, "batch": batch, "image_size": SIZE, "steps_timed": STEPS, "warmup_steps": WARMUP,
            "timing": "cuda events around the steps, one sync at the end" if CUDA else "wall clock around the steps",
            "seconds_per_step": seconds, "img_per_s": batch / seconds, "mode_flops_per_image": mode_flops,
            "memory_at_start_bytes": start_bytes, **memory, **compiled}


def row_selected(request, mode, batch):
    """Whether this session runs the row of (mode, batch) of this test."""
    return any(getattr(item, "callspec", None) is not None and item.originalname == request.node.originalname
               and item.callspec.params.get("mode") == mode and item.callspec.params.get("batch") == batch
               for item in request.session.items)


def reference(request, mode, batch):
    """The figures of a reference mode measured in this run: its row's, or measured here once when its
    row is not selected; None when its row runs later in this session."""
    if (mode, batch) not in _figures:
        if row_selected(request, mode, batch):
            return None
        _figures[(mode, batch)] = {**measure(mode, batch), "measured_without_row": True}
        record(f"{mode}-{batch} (a reference, measured without its row)", _figures[(mode, batch)])
    return _figures[(mode, batch)]


def ratio(figures, ref):
    return figures["img_per_s"] / ref["img_per_s"] if ref is not None else None


@pytest.mark.parametrize("mode,batch", ROWS, ids=[f"{mode}-{batch}" for mode, batch in ROWS])
def test_step_throughput(benchmark, request, mode, batch):
    assert (mode, batch) not in _figures, "each mode is measured once per batch"
    useful_flops = routed_flops_per_image(batch)
    reachable = reachable_flops()
    figures = measure(mode, batch, benchmark)
    _figures[(mode, batch)] = figures
    port, fair = reference(request, "port", batch), reference(request, "fair", batch)
    datasheet = device_peak(PEAK)
    achieved = useful_flops * figures["img_per_s"]
    figures.update({
        "port_img_per_s": port and port["img_per_s"], "fair_img_per_s": fair and fair["img_per_s"],
        "speedup_vs_port": ratio(figures, port), "speedup_vs_fair": ratio(figures, fair),
        "useful_flops_per_image": useful_flops, "achieved_flops_per_s": achieved,
        "datasheet_peak_flops_per_s": datasheet, "mfu_datasheet": achieved / datasheet if datasheet else None,
        "reachable_peak_flops_per_s": reachable["flops_per_s"],
        "reachable_peak_from": f"{reachable['dtype']} matmul {reachable['n']}^3, event-timed in this run",
        "mfu_reachable": achieved / reachable["flops_per_s"],
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "cudnn_benchmark": torch.backends.cudnn.benchmark})
    record(f"{mode}-{batch}", figures, benchmark)
    assert figures["img_per_s"] > 0 and useful_flops > 0
    if mode in ("port", "fair"):  # a reference's row reports the figure the other rows' ratios use
        assert (port if mode == "port" else fair) is figures
