"""The whole training step in images per second: the port-style baseline, our eager step, our fastest step.

One run measures all three, so every speed-up is against a baseline timed in the same run.
Reported in extra_info: img_per_s, speedup_vs_baseline, mfu (FLOPs of our routed step, counted by
torch's FlopCounterMode, per second, over the device's dense bf16 peak), the FLOPs each mode
actually performs, and peak_memory_bytes. Goals on one H200 (README, "Precision and speed"): the fastest step >= 2x a fair eager bf16
baseline at batch 64 and >= 25,000 img/s at batch 512.
On a machine without CUDA the tests run at tiny sizes, only to show that they run and report.
"""
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from baseline import baseline_step
from timing import CUDA, DEVICE, compile_counters, device_peak, median_seconds, sync
from vaegan import options, trainer
from vaegan.config import TrainConfig
from vaegan.models import VAEGAN
from vaegan.optimizers import make_optimizer

SIZE, CHANNELS = (64, 3) if CUDA else (32, 1)
LATENT, FC = (128, 1024) if CUDA else (16, 64)
# VAEGAN_BENCH_BATCHES=64 times one batch size (bench/run_gpu.sh runs one per stage)
BATCHES = [int(b) for b in os.environ.get("VAEGAN_BENCH_BATCHES", "64,256,512").split(",")] if CUDA else [4]
REPEATS, WARMUP = (30, 15) if CUDA else (2, 2)  # CUDA-graph trees record on their second warm-up call
GAMMA = 1e-6
# Dense bf16 tensor-core peaks (FLOP/s): H100 SXM and H200 989.4 TFLOP/s.
PEAK = {"H100": 989.4e12, "H200": 989.4e12}
MODES = ("baseline", "eager", "fastest")


def build(mode, batch):
    """(one training step as a function of nothing, the model). Our modes are the trainer's own step
    (trainer.build_step, options resolved by options.resolve) on one batch of random images."""
    torch.manual_seed(0)
    if mode == "baseline":
        model = VAEGAN("vaegan", SIZE, CHANNELS, latent_size=LATENT, fc_width=FC).to(DEVICE)
        x = (torch.rand(batch, CHANNELS, SIZE, SIZE, device=DEVICE) * 2 - 1)  # random images: never zeros
        z_prior = torch.randn(batch, model.latent_size, device=DEVICE)
        optimizers = {n: make_optimizer("rmsprop", "for-loop", list(net.parameters()), 3e-4, tensor_lr=False)
                      for n, net in model.networks().items()}

        def step():
            baseline_step(model, x, z_prior, optimizers, GAMMA)
        return step, model
    fastest = mode == "fastest"
    if fastest:
        torch._dynamo.reset()  # each case compiles afresh: no earlier case's graphs count against the recompile limit
    cfg = TrainConfig(data="generated", image_size=SIZE, channels=CHANNELS, latent_size=LATENT, fc_width=FC,
                      batch_size=batch, steps=1, gamma=GAMMA, lr_schedule="constant", augment="none", device=DEVICE,
                      out="unused", kernels="triton" if CUDA else "torch", precision="bf16" if fastest else "fp32",
                      memory_format="channels-last" if fastest else "contiguous", compile=fastest,
                      cuda_graphs=fastest and CUDA, compile_backend="inductor" if CUDA else "aot_eager")
    cfg, _ = options.resolve(cfg, torch.device(DEVICE))
    model, _, train_step = trainer.build_step(cfg, torch.device(DEVICE))
    x = (torch.rand(batch, CHANNELS, SIZE, SIZE, device=DEVICE) * 2 - 1)  # random images: never zeros
    steps = iter(range(10 ** 9))

    def step():  # as the training loop runs it: noise, decisions and masked updates on the device, no sync
        train_step(x, None, next(steps))
    return step, model


def counted_flops(step):
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


_baseline_img_per_s, _routed_flops = {}, {}


def baseline_img_per_s(batch):
    if batch not in _baseline_img_per_s:
        step, _ = build("baseline", batch)
        _baseline_img_per_s[batch] = batch / median_seconds(step, REPEATS, WARMUP)
    return _baseline_img_per_s[batch]


def routed_flops_per_image(batch):
    """The useful work: FLOPs of our eager routed step (one forward, one backward, three optimizer steps)."""
    if batch not in _routed_flops:
        step, _ = build("eager", batch)
        step()  # optimizer state exists before counting
        _routed_flops[batch] = counted_flops(step) / batch
    return _routed_flops[batch]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", MODES)
def test_step_throughput(benchmark, mode, batch):
    baseline = baseline_img_per_s(batch)
    useful_flops = routed_flops_per_image(batch)
    step, model = build(mode, batch)
    before = compile_counters()
    for _ in range(WARMUP):
        step()
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(lambda: (step(), sync()), rounds=REPEATS, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    img_per_s = batch / seconds
    peak = device_peak(PEAK)
    compiled = {name: value - before[name] for name, value in compile_counters().items()}
    mode_flops = None if mode == "fastest" else counted_flops(step) / batch  # (compiled code hides its ops)
    benchmark.extra_info.update({
        "mode": mode, "batch": batch, "image_size": SIZE, "img_per_s": img_per_s,
        "baseline_img_per_s": baseline, "speedup_vs_baseline": img_per_s / baseline,
        "useful_flops_per_image": useful_flops, "mode_flops_per_image": mode_flops,
        "mfu": useful_flops * img_per_s / peak if peak else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if CUDA else None, **compiled})
    # the figure is the mode it names: nothing fell back to eager, no CUDA graph was skipped
    assert compiled["recompile_limit_hits"] == 0 and compiled["cudagraph_skips"] == 0, compiled
    if mode == "fastest":
        assert compiled["unique_graphs"] > 0
    assert img_per_s > 0 and benchmark.extra_info["speedup_vs_baseline"] > 0
    assert useful_flops > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
