"""Images per second of the loaders over a generated CelebA-like folder (178x218 JPEGs).

DALI decodes on the GPU where there is one (nvJPEG, on its CPU operators elsewhere); the PIL
DataLoader decodes in N workers. Both hand the decoded uint8 batch to the same batched preprocessing
(device_preprocess.preprocess_batch: on the GPU for both on CUDA; on a CPU in the PIL workers, on
the main thread for DALI), and the rate counts it. Each test also measures the PIL loader with the most workers
in the same run and reports the ratio. Goal, on one H200: the loader at least as fast as the step it feeds
(the loop >= 20,000 img/s at 64 px and >= 0.95 of the bare step).
"""
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from datagen import make_celeba  # noqa: E402
from vaegan.data import StepBatchSampler, build_dataset, make_loader  # noqa: E402
from vaegan.data.loader import PREFETCH_PER_WORKER  # noqa: E402
from vaegan.data.dali import DaliLoader, dali_unavailable_reason  # noqa: E402

CUDA = torch.cuda.is_available()
IMAGES = 4096 if CUDA else 48
BATCH = 256 if CUDA else 8
WORKERS = [4, 8, 16] if CUDA else [0, 2]


@pytest.fixture(scope="module")
def celeba_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    make_celeba(root, n=IMAGES * 4 // 3)  # a quarter of the files is the test split
    return build_dataset(str(root), "train", 64, 3)


def images_per_second(make, steps, skip=1):
    """The rate after `skip` batches: start-up (workers, pipeline build) and, with skip >= the batches
    the workers prefetch, the queue they filled meanwhile are excluded (timing the queue would
    measure nothing)."""
    loader = make(skip + steps)
    start = None
    count = 0
    for i, (images, _, _) in enumerate(loader):
        if CUDA:
            images = images.cuda(non_blocking=True)
            torch.cuda.synchronize()
        if i == skip - 1:
            start = time.perf_counter()
        elif i >= skip:
            count += images.shape[0]
    return count / (time.perf_counter() - start)


def pil(dataset, workers):
    return lambda steps: make_loader(dataset, StepBatchSampler(len(dataset), BATCH, 0, 1, 0, 0, steps), workers,
                                     pin_memory=CUDA)


def dali(dataset):
    return lambda steps: DaliLoader(dataset, BATCH, 0, 1, 0, 0, steps, device="cuda" if CUDA else "cpu",
                                    device_id=0 if CUDA else None)


def steps_of(dataset):
    return len(dataset) // BATCH



@pytest.mark.parametrize("workers", WORKERS)
def test_pil_loader(benchmark, celeba_like, workers):
    rate = benchmark.pedantic(lambda: images_per_second(pil(celeba_like, workers), steps_of(celeba_like),
                                                        skip=max(1, workers * PREFETCH_PER_WORKER)), rounds=1, iterations=1)
    benchmark.extra_info.update({"img_per_s": rate, "workers": workers, "batch": BATCH})
    assert rate > 0


@pytest.mark.skipif(dali_unavailable_reason() is not None, reason=str(dali_unavailable_reason()))
def test_dali_loader(benchmark, celeba_like):
    baseline = images_per_second(pil(celeba_like, WORKERS[-1]), steps_of(celeba_like),
                                 skip=max(1, WORKERS[-1] * PREFETCH_PER_WORKER))
    rate = benchmark.pedantic(lambda: images_per_second(dali(celeba_like), steps_of(celeba_like)),
                              rounds=1, iterations=1)
    benchmark.extra_info.update({"img_per_s": rate, "pil_img_per_s": baseline, "pil_workers": WORKERS[-1],
                                 "speedup_vs_pil": rate / baseline, "batch": BATCH,
                                 "device": "gpu" if CUDA else "cpu operators"})
    assert rate > 0 and baseline > 0
