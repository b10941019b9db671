"""Timing helpers the benchmarks share: synchronise, the median of timed calls, the device's peak."""
import statistics
import time

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync():
    if CUDA:
        torch.cuda.synchronize()


def median_seconds(fn, repeats, warmup):
    """Median wall time of `repeats` calls of fn, each synchronised, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_peak(peaks):
    """The entry of `peaks` (keyed by a part of the device's name) for this GPU; None for a CPU, a
    PCIe card or a device not in the table (a figure is then reported without its fraction)."""
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in peaks.items() if key in name and "PCIe" not in name), None)


def compile_counters():
    """What torch.compile did so far: graphs compiled, recompile-limit fallbacks, CUDA-graph skips."""
    from torch._dynamo.utils import counters
    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "recompile_limit_hits": sum(v for k, v in counters["unimplemented"].items() if "recompile limit" in k.lower()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
