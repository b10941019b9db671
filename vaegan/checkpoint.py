"""Checkpoints and other run files, written atomically: a temporary file, fsync, then rename.

A run killed at any moment (SIGKILL included) therefore leaves either the previous complete
file or the new complete file, never a torn one.
"""
import json
import os
import tempfile

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
