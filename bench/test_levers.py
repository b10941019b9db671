"""Each lever of the step against the fastest step without it, measured in the same run.

Rows: `fastest` (bench/baseline.py's fastest mode, every lever at its default) and the fastest mode
with one lever on, at each batch; `speedup_vs_fastest` is a row's img/s over the `fastest` row's of
this run. The method is bench/test_step.py's (`measure`: CUDA events around STEPS steps, one
synchronisation at the end; cudnn.benchmark on; peak memory with the CUDA-graph pools; no recompile
and no CUDA-graph skip behind a figure). The levers:
  * pad-channels: the 3-channel convolutions computed with 8 channels (--pad-channels);
  * decoder-joint: the decoder's two passes in one call (--decoder-call joint);
  * fused-rmsprop: the masked RMSprop as the fused Triton kernel (--optimizer-impl fused);
  * fuse-bn-relu: each BatchNorm -> ReLU -> convolution as one Triton kernel (--fuse-bn-relu);
  * max-autotune: inductor's max-autotune (--max-autotune; inductor only: not on a CPU, where the
    fastest mode compiles with aot_eager);
  * all: every lever above at once.
VAEGAN_BENCH_LEVERS=pad-channels,decoder-joint times a subset (the `fastest` row always runs);
VAEGAN_BENCH_BATCHES as in bench/test_step.py. On a machine without CUDA: tiny sizes, only to show
that the rows run and report.
"""
import os

import pytest

from test_step import BATCHES, measure
from timing import CUDA, record

LEVERS = {
    "pad-channels": {"pad_channels": True},
    "decoder-joint": {"decoder_call": "joint"},
    "fused-rmsprop": {"optimizer_impl": "fused"},
    "fuse-bn-relu": {"fuse_bn_relu": True},
}
if CUDA:
    LEVERS["max-autotune"] = {"max_autotune": True}
LEVERS["all"] = {k: v for levers in LEVERS.values() for k, v in levers.items()}
CHOSEN = os.environ.get("VAEGAN_BENCH_LEVERS")
if CHOSEN:
    unknown = set(CHOSEN.split(",")) - set(LEVERS)
    if unknown:
        raise ValueError(f"VAEGAN_BENCH_LEVERS: {', '.join(sorted(unknown))} not among {', '.join(LEVERS)}")
    LEVERS = {name: LEVERS[name] for name in CHOSEN.split(",")}
ROWS = [(lever, batch) for batch in BATCHES for lever in ("fastest", *LEVERS)]

_fastest = {}


@pytest.mark.parametrize("lever,batch", ROWS, ids=[f"{lever}-{batch}" for lever, batch in ROWS])
def test_lever_throughput(benchmark, lever, batch):
    figures = measure("fastest", batch, benchmark, levers=LEVERS.get(lever))
    if lever == "fastest":
        _fastest[batch] = figures
    reference = _fastest.get(batch)
    figures.update({"lever": lever, "fastest_img_per_s": reference and reference["img_per_s"],
                    "speedup_vs_fastest": figures["img_per_s"] / reference["img_per_s"] if reference else None})
    record(f"{lever}-{batch}", figures, benchmark)
    assert figures["img_per_s"] > 0
    assert reference is not None, "the fastest row runs first at each batch"
