"""Checkpoints and other run files, written atomically: a temporary file, fsync, then rename.

A run killed at any moment (SIGKILL included) therefore leaves either the previous complete
file or the new complete file, never a torn one.
"""
import json
import os
import tempfile
import time

import torch

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    pass


def atomic_write(path, write):
    """Call write(file object) on a temporary file beside `path`, then rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(directory):
    """Temporary files that a killed run left behind (the files they were replacing are intact)."""
    for name in os.listdir(directory):
        if name.startswith(".") and name.endswith(".tmp"):
            os.unlink(os.path.join(directory, name))


def save(path, state):
    atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))


def write_json(path, value):
    atomic_write(path, lambda f: f.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode()))


def resolve(path):
    """A checkpoint file, or a run directory holding checkpoint.pt."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no checkpoint there")
    return path


def load(path, map_location="cpu"):
    path = resolve(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a torn or foreign file: say which, in one line
        raise CheckpointError(f"{path}: not a readable vaegan checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a vaegan checkpoint of format {FORMAT_VERSION}")
    return state


def snapshot(value):
    """A copy of `value` (nested dicts/lists/tuples of tensors and plain values) on the CPU, taken
    at this point of the device's stream: the copies are queued (non-blocking), so the caller does
    not wait; what later steps change in place is not in the copy. Wait for the copies with the
    event `Writer.submit` records."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True, non_blocking=value.is_cuda)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


class Writer:
    """Writes files on a background thread, one job at a time: submit() returns at once unless the
    previous job is still running (then it waits for it: at most one in flight). A job's error is
    raised by the next submit() or by wait()."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaegan-writer")
        self.pending = None

    def submit(self, job, *args):
        """job(*args) on the writer thread, after the device work queued so far (snapshot's copies)."""
        self.wait()
        ready = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            ready = torch.cuda.Event()
            ready.record()
        self.pending = self.pool.submit(_after, ready, job, *args)

    def wait(self):
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self):
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def _after(ready, job, *args):
    if ready is not None:
        ready.synchronize()
    job(*args)


class CheckpointSchedule:
    """When checkpoint.pt is rewritten: every `minutes` (decided at log steps, the same on every
    process: `agree` makes one process's True everyone's), every `every` steps, at the last step, on
    a stop, and at each kept step (`keep_every`, which also keeps checkpoint-STEP.pt)."""

    def __init__(self, minutes, every, keep_every, last_step, log_every, agree=lambda flag: flag):
        self.minutes, self.every, self.keep_every, self.last_step, self.log_every = minutes, every, keep_every, last_step, log_every
        self.agree = agree
        self.last_write, self.minutes_due = time.monotonic(), False

    def due(self, step, stopping):
        if self.minutes > 0 and step % self.log_every == 0:
            self.minutes_due = self.agree(time.monotonic() - self.last_write >= 60 * self.minutes)
        due = (self.minutes_due or (self.every and step % self.every == 0) or step == self.last_step or stopping
               or step % self.keep_every == 0)
        if due:
            self.last_write, self.minutes_due = time.monotonic(), False
        return due

    def paths(self, directory, step):
        paths = [os.path.join(directory, CHECKPOINT)]
        if step > 0 and step % self.keep_every == 0:
            paths.append(os.path.join(directory, f"checkpoint-{step:07d}.pt"))
        return paths
