"""Checkpoints and other run files, written atomically: a temporary file, fsync, then rename.

A run killed at any moment (SIGKILL included) therefore leaves either the previous complete
file or the new complete file, never a torn one.
"""
import errno
import io
import json
import os
import shutil
import tempfile
import time

import torch

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    pass


class DiskFullError(CheckpointError):
    """A file that did not fit: no space left on its filesystem (or the user's quota is used up)."""


def atomic_write(path, write, what=None):
    """Call write(file object) on a temporary file beside `path`, then rename it over `path`.
    A full disk is a DiskFullError naming the file (`what` describes it), the bytes it needs and
    the bytes free; the temporary file is removed and a previous file at `path` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if out_of_space(e):  # one error, not a chain ending in torch's "unexpected pos"
            raise DiskFullError(disk_full_message(path, write, what, directory)) from None
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def out_of_space(error):
    """Whether `error`, or one it was raised while handling, is a write that found no room: torch.save
    turns a failed write into a RuntimeError ("unexpected pos ...") raised while handling the OSError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class _ByteCounter(io.RawIOBase):
    """A file that keeps nothing and counts what is written to it."""

    def __init__(self):
        self.size = 0

    def writable(self):
        return True

    def write(self, data):
        n = memoryview(data).nbytes
        self.size += n
        return n

    def tell(self):
        return self.size


def disk_full_message(path, write, what, directory):
    counter = _ByteCounter()
    try:
        write(counter)  # the same bytes again, to a counter: the size the file would have had
        needed = f"it needs {counter.size:,} bytes"
    except Exception:
        needed = "its size could not be measured"
    free = shutil.disk_usage(directory).free
    name = os.path.basename(path)
    previous = f"the previous {name} is intact" if os.path.exists(path) else f"no {name} was written"
    return (f"{path}: no space left on the device for {what or 'this file'}: {needed}, {free:,} bytes are free "
            f"there; {previous}")


def append_whole(path, data, what):
    """Append the bytes `data` to `path`, whole or not at all: on a full disk the file is cut back to its
    previous size (its earlier lines or records stay readable) and a DiskFullError names it (`what`
    describes the bytes), the bytes needed and the bytes free."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "ab") as f:
            f.write(data)
    except OSError as e:
        if not out_of_space(e):
            raise
        try:
            os.truncate(path, size)
        except OSError:
            pass
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise DiskFullError(f"{path}: no space left on the device for {what}: it needs {len(data):,} bytes, "
                            f"{free:,} bytes are free there; the file keeps what it held before") from None


def remove_stale_temporaries(directory):
    """Temporary files that a killed run left behind (the files they were replacing are intact)."""
    for name in os.listdir(directory):
        if name.startswith(".") and name.endswith(".tmp"):
            os.unlink(os.path.join(directory, name))


def save(path, state):
    what = f"the checkpoint of step {state['step']}" if "step" in state else "the checkpoint"
    atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f), what)


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
    raised by the next check(), submit() or wait()."""

    def __init__(self, device=None):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaegan-writer")
        self.pending = None
        self.device = torch.device(device) if device is not None else None

    def submit(self, job, *args):
        """job(*args) on the writer thread, after the work queued so far on the training device's current
        stream (snapshot's copies): the writer's `device`, else CUDA's current device."""
        self.wait()
        ready = None
        if self.device is not None and self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        elif self.device is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            ready = torch.cuda.Event()
            ready.record()
        self.pending = self.pool.submit(_after, ready, job, *args)

    def check(self):
        """Raise a finished job's error now; does not wait for a job still running."""
        if self.pending is not None and self.pending.done():
            self.wait()

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
