"""What `train.py` does per batch on each loader, against the bare step, measured in one run.

Each loader is opened as the trainer opens it (trainer.open_loader, with the run's resolved options):
on CUDA the decoded cache on the GPU and in host memory, the PIL DataLoader workers and DALI where
installed; on a CPU the host cache, the PIL workers (0 and 2) and DALI's CPU operators. Its rate
covers everything a batch needs before the step: decoding (or the cache's rows), the copy to the
device, the authors' augmentation and the preprocessing on the device. Beside it, in the same test:
the decoding alone (the PIL workers' uint8 batches), the device-side preprocessing alone (on a
decoded batch already on the device), and the trainer's bare step (trainer.build_step, on one batch
held on the device). Reported in extra_info and the rows file: each rate and loader_over_step, the
ratio that says whether the loader keeps up with the step (it must be well above 1 to hide behind
it). No time is asserted. On a CPU the sizes are tiny: the figures only show that it runs.
"""
import os
import sys

import pytest
import torch

from timing import CUDA, DEVICE, StepClock, record, sync
from vaegan import distributed, options, trainer
from vaegan.config import TrainConfig
from vaegan.data import build_dataset
from vaegan.data.dali import dali_unavailable_reason
from vaegan.data.loader import PREFETCH_PER_WORKER, BatchPreprocess, CollateDecoded, DecodedFiles

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from datagen import make_celeba  # noqa: E402

if CUDA:  # the default command's settings (64 px, batch 64 or VAEGAN_BENCH_LOOP_BATCH), generated JPEGs
    IMAGES, WORKERS, TIMED = 4096, min(16, os.cpu_count() or 1), 40
    SETTINGS = dict(batch_size=int(os.environ.get("VAEGAN_BENCH_LOOP_BATCH", 64)))
    LOADERS = {"cache-gpu": dict(data_cache="gpu"), "cache-host": dict(data_cache="host"),
               f"pil-{WORKERS}": dict(loader="pil", data_cache="none", workers=WORKERS),
               "dali": dict(loader="dali", data_cache="none")}
else:
    IMAGES, WORKERS, TIMED = 48, 2, 3
    SETTINGS = dict(image_size=32, latent_size=16, fc_width=64, width=0.25, batch_size=4, precision="fp32")
    LOADERS = {"cache-host": dict(data_cache="host"), "pil-0": dict(loader="pil", data_cache="none", workers=0),
               "pil-2": dict(loader="pil", data_cache="none", workers=2),
               "dali": dict(loader="dali", data_cache="none")}


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    make_celeba(root, n=IMAGES * 4 // 3)  # a quarter of the files is the test split
    return str(root)


def resolved(root, steps, **choices):
    """(cfg, dataset, the loader's description) as the trainer resolves them, the authors' augmentation on."""
    cfg = TrainConfig(data=root, device=DEVICE, steps=steps, augment="authors", **{**SETTINGS, **choices}).resolved()
    dataset = build_dataset(cfg.data, "train", cfg.image_size, cfg.channels)
    cfg, reasons = options.resolve(cfg, options.resolve_device(cfg.device), 1, dataset)
    return cfg, dataset, reasons["loader"]


def batches_per_second(batches, skip, timed):
    """Batches a second from an iterator of batches, after `skip` (start-up and the queue the workers
    filled meanwhile): StepClock over `timed` calls, each taking one batch and its work on the device."""
    for _ in range(skip):
        next(batches)
    sync()
    return 1.0 / StepClock(lambda: next(batches), timed).run()


def loader_batches(cfg, dataset, reason):
    device = torch.device(DEVICE, 0) if CUDA else torch.device(DEVICE)
    loader, _, kind, description = trainer.open_loader(cfg, dataset, distributed.Context(), device, 0, reason, False)
    return (images for images, _, _ in loader), kind, description


def decode_batches(cfg, dataset, steps):
    """The PIL workers' decoding alone: uint8 batches, as the loader's workers hand them."""
    from vaegan.data import StepBatchSampler
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, 0, 1, cfg.seed, 0, steps)
    loader = torch.utils.data.DataLoader(DecodedFiles(dataset), batch_sampler=sampler, num_workers=WORKERS,
                                         collate_fn=CollateDecoded(), prefetch_factor=PREFETCH_PER_WORKER)
    return (images for images, *_ in loader)


def preprocess_batches(cfg, dataset):
    """The device-side preprocessing alone, on one decoded batch held on the device (a new step each call)."""
    device = torch.device(DEVICE)
    images = torch.stack([torch.from_numpy(dataset.decode(i)) for i in range(cfg.batch_size)]).to(device)
    flips = torch.arange(cfg.batch_size, device=device) % 2 == 1
    preprocess = BatchPreprocess.of(dataset)
    step = 0
    while True:
        step += 1
        yield preprocess(images, flips, [(cfg.seed, step, j) for j in range(cfg.batch_size)])


def step_batches(cfg):
    """The trainer's bare step on one batch held on the device."""
    _, _, train_step = trainer.build_step(cfg, torch.device(DEVICE))
    x = torch.rand(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, device=DEVICE) * 2 - 1
    step = 0
    while True:
        train_step(x, None, step)
        step += 1
        yield x


@pytest.mark.parametrize("name", list(LOADERS))
def test_loader_against_the_bare_step(benchmark, celeba_root, name):
    choices = LOADERS[name]
    if choices.get("loader") == "dali" and dali_unavailable_reason():
        pytest.skip(dali_unavailable_reason())
    skip = max(2, choices.get("workers", 0) * PREFETCH_PER_WORKER + 1)
    steps = skip + TIMED + 1
    cfg, dataset, reason = resolved(celeba_root, steps, **choices)
    batches, kind, description = loader_batches(cfg, dataset, reason)
    loader_rate = benchmark.pedantic(lambda: batches_per_second(batches, skip, TIMED), rounds=1, iterations=1)
    for _ in batches:  # to its end: DALI's pipeline and the DataLoader's workers shut down
        pass
    decode_skip = WORKERS * PREFETCH_PER_WORKER + 1
    decode_rate = batches_per_second(decode_batches(cfg, dataset, decode_skip + TIMED), decode_skip, TIMED)
    preprocess_rate = batches_per_second(preprocess_batches(cfg, dataset), 2, TIMED)
    torch._dynamo.reset()
    step_rate = batches_per_second(step_batches(cfg), 3, TIMED)
    images = cfg.batch_size
    figures = {"loader_img_per_s": loader_rate * images, "decode_img_per_s": decode_rate * images,
               "decode_workers": WORKERS, "preprocess_img_per_s": preprocess_rate * images,
               "step_img_per_s": step_rate * images, "loader_over_step": loader_rate / step_rate,
               "loader": kind, "data_cache": cfg.data_cache, "description": description, "batch": cfg.batch_size,
               "image_size": cfg.image_size, "augment": cfg.augment, "compile": cfg.compile,
               "cuda_graphs": cfg.cuda_graphs, "precision": cfg.precision, "timed_batches": TIMED}
    record(f"loader-{name}-{cfg.batch_size}", figures, benchmark)
    print(f"\n{name}: loader {figures['loader_img_per_s']:.0f} img/s (decode {figures['decode_img_per_s']:.0f}, "
          f"preprocess {figures['preprocess_img_per_s']:.0f}), bare step {figures['step_img_per_s']:.0f} img/s: "
          f"loader/step {figures['loader_over_step']:.2f}")
    assert loader_rate > 0 and decode_rate > 0 and preprocess_rate > 0 and step_rate > 0
