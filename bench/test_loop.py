"""The whole training loop against the bare step, both measured in one run.

The loop is `trainer.train`: data loading, the step, the log steps, the sample grids and the
checkpoints at their default intervals; its rate is read from metrics.jsonl over the intervals
after warm-up (compilation and the first steps excluded). The bare step is the same model and
step (gradients, the device-side decisions, the masked optimizer steps) on one batch held on the
device, nothing else. Reported in extra_info: loop_img_per_s, step_img_per_s and their ratio.
Goal: >= 0.95 on a GPU; >= 0.9 on a CPU at the small configuration used there.

On a GPU the loop runs the default command's settings (64 px, batch 64 or VAEGAN_BENCH_LOOP_BATCH,
the authors' augmentation, compiled with CUDA graphs) on generated 178x218 JPEGs, once per loader: the decoded cache on the
GPU, the PIL workers (decoding only; preprocessed on the GPU) and DALI where installed. Its rate is
measured only after the DataLoader's prefetch queue (workers x PREFETCH_PER_WORKER batches, filled
while the step compiles) has been drained, so it is the steady rate, not the queue's.
"""
import json
import math
import os
import sys
import time

import pytest
import torch

from timing import CUDA, DEVICE, record, sync
from vaegan import options, trainer
from vaegan.config import TrainConfig
from vaegan.data import build_dataset
from vaegan.data.dali import dali_unavailable_reason
from vaegan.data.loader import PREFETCH_PER_WORKER

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from datagen import make_celeba  # noqa: E402

LOG_EVERY = 10
if CUDA:  # the default command's settings (trainer defaults) on generated CelebA-like JPEGs
    WORKERS = min(16, os.cpu_count() or 1)
    WARMUP_LOGS = math.ceil((WORKERS * PREFETCH_PER_WORKER + 50) / LOG_EVERY)  # past compiling and the queue
    STEPS = WARMUP_LOGS * LOG_EVERY + int(os.environ.get("VAEGAN_BENCH_LOOP_STEPS", 400))  # measured after warm-up
    # VAEGAN_BENCH_LOOP_BATCH=512: the 25,000 img/s goal in the loop (bench/run_gpu.sh loop512)
    SETTINGS = dict(workers=WORKERS, batch_size=int(os.environ.get("VAEGAN_BENCH_LOOP_BATCH", 64)))
    # default: what train.py chooses with no option given (bench/run_gpu.sh quick)
    LOADERS = {"default": {}, "cache": dict(data_cache="gpu"), "pil": dict(loader="pil", data_cache="none"),
               "dali": dict(loader="dali", data_cache="none")}
else:  # small enough that what the loop adds would show (the built-in faces: one loader)
    STEPS, WARMUP_LOGS = 130, 2
    SETTINGS = dict(image_size=32, channels=1, latent_size=16, fc_width=64, width=0.25, batch_size=16, workers=0)
    LOADERS = {"pil": {}}


def loop_config(tmp_path, loader="pil"):
    data = "builtin:faces"
    if CUDA:
        data = str(tmp_path.parent / "celeba")
        if not os.path.isdir(data):
            make_celeba(data, n=8192)
    return TrainConfig(data=data, steps=STEPS, device=DEVICE, out=str(tmp_path / "run"), log_every=LOG_EVERY,
                       **SETTINGS, **LOADERS[loader])


def resolved(cfg):
    """`cfg` with every default resolved as the loop resolves it."""
    cfg = cfg.resolved()
    dataset = build_dataset(cfg.data, "train", cfg.image_size, cfg.channels)
    return options.resolve(cfg, options.resolve_device(cfg.device), 1, dataset)[0]


def loop_img_per_s(tmp_path, loader):
    cfg = loop_config(tmp_path, loader)
    trainer.train(cfg)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f][WARMUP_LOGS:]
    images = seconds = 0.0
    previous = None
    for r in records:
        steps = r["step"] - previous if previous is not None else cfg.log_every
        previous = r["step"]
        images += steps * cfg.batch_size
        seconds += steps * cfg.batch_size / r["img_per_s"]
    return images / seconds


def step_img_per_s(cfg, steps):
    """The trainer's own step (trainer.build_step) on one batch held on the device."""
    device = torch.device(DEVICE)
    _, _, train_step = trainer.build_step(cfg, device)
    x = torch.rand(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    for i in range(10):
        train_step(x, None, i)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        train_step(x, None, 10 + i)
    sync()
    return steps * cfg.batch_size / (time.perf_counter() - start)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_loop_against_the_bare_step(benchmark, tmp_path, loader):
    # the bare step is timed before and after the loop (the machine's speed drifts; on a CPU by
    # several percent): the ratio is against their mean
    if loader == "dali" and dali_unavailable_reason():
        pytest.skip(dali_unavailable_reason())
    cfg = resolved(loop_config(tmp_path, loader))
    torch._dynamo.reset()
    before = step_img_per_s(cfg, STEPS - WARMUP_LOGS * cfg.log_every)
    record(f"{loader}-{cfg.batch_size}-step-before", {"step_img_per_s_before": before})  # kept if the loop is stopped
    torch._dynamo.reset()
    loop = benchmark.pedantic(lambda: loop_img_per_s(tmp_path, loader), rounds=1, iterations=1)
    record(f"{loader}-{cfg.batch_size}-loop", {"loop_img_per_s": loop})
    torch._dynamo.reset()
    after = step_img_per_s(cfg, STEPS - WARMUP_LOGS * cfg.log_every)
    bare = (before + after) / 2
    figures = {"loop_img_per_s": loop, "step_img_per_s": bare, "loop_over_step": loop / bare,
               "step_img_per_s_before": before, "step_img_per_s_after": after,
               "batch": cfg.batch_size, "image_size": cfg.image_size, "precision": cfg.precision,
               "compile": cfg.compile, "cuda_graphs": cfg.cuda_graphs, "loader": cfg.loader,
               "data_cache": cfg.data_cache, "warmup_steps": WARMUP_LOGS * cfg.log_every,
               "augment": cfg.augment, "dali": dali_unavailable_reason() or "installed",
               "log_every": cfg.log_every, "sample_every": cfg.sample_every, "checkpoint_every": cfg.checkpoint_every}
    record(f"{loader}-{cfg.batch_size}", figures, benchmark)
    print(f"\n{loader}: loop {loop:.1f} img/s, bare step {bare:.1f} img/s: {loop / bare:.3f}")
    assert loop > 0 and bare > 0
