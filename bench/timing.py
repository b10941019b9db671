"""Timing helpers the benchmarks share: synchronise, steps (or kernel calls) timed between two events, the
device's datasheet peak and the peak a matrix product reaches."""
import json
import os
import time

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync():
    if CUDA:
        torch.cuda.synchronize()


class StepClock:
    """Times `steps` calls of fn as one stretch: a CUDA event recorded before the first call and one
    after the last, nothing waiting for the device in between, one synchronisation at the end (on a
    CPU, the wall clock over the same calls). What it measures is throughput: the host queues step
    k+1 while the device runs step k, so a step's launch overhead counts only where it is not hidden.

    Call the clock `steps` times (`benchmark.pedantic(clock, iterations=steps)` does, and its wall
    clock then spans the same stretch); calls after the last do nothing (pytest-benchmark calls its
    target once more for the result). `run()` makes every call; `seconds_per_step` is the figure."""

    def __init__(self, fn, steps):
        if steps < 1:
            raise ValueError("StepClock needs at least one step")
        self.fn, self.steps, self.calls = fn, steps, 0
        self.start = self.end = None
        self.seconds = None  # the whole stretch, once the last call returned

    def __call__(self):
        if self.calls >= self.steps:
            return
        if self.calls == 0:
            self.start = self._mark()
        self.fn()
        self.calls += 1
        if self.calls == self.steps:
            self.end = self._mark()
            if CUDA:
                self.end.synchronize()
                self.seconds = self.start.elapsed_time(self.end) / 1e3
            else:
                self.seconds = self.end - self.start

    @staticmethod
    def _mark():
        if CUDA:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def run(self):
        while self.calls < self.steps:
            self()
        return self.seconds_per_step

    @property
    def seconds_per_step(self):
        if self.seconds is None:
            raise RuntimeError(f"the clock has timed {self.calls} of its {self.steps} steps")
        return self.seconds / self.steps


def event_seconds(fn, steps, warmup=0):
    """Seconds per call of fn over `steps` calls timed as one stretch (StepClock), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync()
    return StepClock(fn, steps).run()


def device_peak(peaks):
    """The entry of `peaks` (keyed by a part of the device's name) for this GPU; None for a CPU, a
    PCIe card or a device not in the table (a figure is then reported without its fraction)."""
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in peaks.items() if key in name and "PCIe" not in name), None)


_reachable = {}


def reachable_flops(n=None, dtype=None, steps=None):
    """{"flops_per_s", "n", "dtype", "seconds_per_matmul"}: what one n x n x n matrix product reaches
    on this device, timed like the steps (StepClock, after warm-up): the peak the machine attains in
    practice, beside the datasheet's. bf16 8192^3 on CUDA; on a CPU 512^3 in bf16 where the CPU has
    bf16 instructions, else float32 (a figure that only shows the code runs). Measured once per
    process, size and type."""
    if dtype is None:
        from vaegan.options import cpu_has_native_bf16
        dtype = torch.bfloat16 if CUDA or cpu_has_native_bf16() else torch.float32
    n = n or (8192 if CUDA else 512)
    steps = steps or (20 if CUDA else 3)
    key = (n, dtype, steps)
    if key not in _reachable:
        generator = torch.Generator(DEVICE).manual_seed(0)
        a = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=generator)
        b = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=generator)
        out = torch.empty(n, n, device=DEVICE, dtype=dtype)
        seconds = event_seconds(lambda: torch.mm(a, b, out=out), steps, warmup=3)
        _reachable[key] = {"flops_per_s": 2 * n ** 3 / seconds, "n": n, "dtype": str(dtype).replace("torch.", ""),
                           "seconds_per_matmul": seconds}
        del a, b, out
    return _reachable[key]


def compile_counters():
    """What torch.compile did so far: graphs compiled, recompile-limit fallbacks, CUDA-graph skips."""
    from torch._dynamo.utils import counters
    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "recompile_limit_hits": sum(v for k, v in counters["unimplemented"].items() if "recompile limit" in k.lower()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def free_device_memory():
    """Drop dynamo's caches (and with them inductor's CUDA-graph pools) and the allocator's cached
    blocks, so that a measurement's memory window starts from what is really held."""
    import gc
    torch._dynamo.reset()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def memory_window():
    """Start a peak-memory window: (bytes allocated at its start). Call before building and warming
    up a step, so compilation and CUDA-graph recording (their pools) fall inside it."""
    if not CUDA:
        return None
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def memory_peaks():
    """{"peak_memory_allocated_bytes", "peak_memory_reserved_bytes"} since memory_window (None on a CPU)."""
    if not CUDA:
        return {"peak_memory_allocated_bytes": None, "peak_memory_reserved_bytes": None}
    return {"peak_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved()}


# bench/run_gpu.sh: one JSON line per row, appended as soon as it is measured (pytest-benchmark writes its
# file at the end of the session: a stage stopped by its time limit keeps these)
ROWS_FILE = os.environ.get("VAEGAN_BENCH_ROWS")


def record(row, figures, benchmark=None):
    """A benchmark row's figures: into pytest-benchmark's extra_info (when given) and, at once, the rows file."""
    if benchmark is not None:
        benchmark.extra_info.update(figures)
    if ROWS_FILE:
        with open(ROWS_FILE, "a") as f:
            f.write(json.dumps({"row": row, **figures}, default=str) + "\n")
