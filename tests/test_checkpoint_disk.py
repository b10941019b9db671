"""A full disk: one error naming the file, the bytes it needs, the bytes free and the step; the
previous file intact; a run stops at the next step with that one line."""
import errno
import io
import json
import os
import re
import shutil
import threading
import time

import pytest
import torch

from conftest import SMALL
from vaegan import checkpoint
from vaegan.cli import train_command
from vaegan.train_step import TrainStep

NEEDED_AND_FREE = re.compile(r"it needs ([\d,]+) bytes, ([\d,]+) bytes are free there")


class FilledFile(io.FileIO):
    """A file on a disk with `room` bytes left: writes past it fail with `error` (a short write first,
    as the kernel does)."""

    def __init__(self, fd, room, error):
        super().__init__(fd, "wb")
        self.room, self.error = room, error

    def write(self, data):
        n = min(memoryview(data).nbytes, self.room)
        if n == 0:
            raise OSError(self.error, os.strerror(self.error))
        self.room -= n
        return super().write(memoryview(data)[:n])


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(name, room, first=1, error=ENOSPC): from the `first`-th temporary file atomic_write
    opens for `name` on, that file has `room` bytes of space."""
    real_fdopen = os.fdopen

    def fill(name, room, first=1, error=errno.ENOSPC):
        opened = [0]

        def fdopen(fd, *args, **kwargs):
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
                opened[0] += 1
                if opened[0] >= first:
                    return io.BufferedWriter(FilledFile(fd, room, error))
            return real_fdopen(fd, *args, **kwargs)
        monkeypatch.setattr(os, "fdopen", fdopen)
    return fill


def needed_and_free(message):
    needed, free = NEEDED_AND_FREE.search(message).groups()
    return int(needed.replace(",", "")), int(free.replace(",", ""))


@pytest.mark.parametrize("room", [0, 5000, "all but 100"])
def test_a_full_disk_is_one_error_naming_file_bytes_free_and_step_and_the_previous_checkpoint_stays(
        tmp_path, full_disk, room):
    path = tmp_path / "checkpoint.pt"
    state = {"step": 10, "model": {"w": torch.randn(300, 300)}, "torch_rng": torch.get_rng_state()}
    checkpoint.save(str(path), state)
    size = path.stat().st_size
    # no room at all, room for part of torch's records, and a failure in the last bytes
    full_disk("checkpoint.pt", size - 100 if room == "all but 100" else room)
    with pytest.raises(checkpoint.DiskFullError) as raised:
        checkpoint.save(str(path), {**state, "step": 20})
    message = str(raised.value)
    assert message.startswith(f"{path}: no space left on the device for the checkpoint of step 20: ")
    assert message.endswith("the previous checkpoint.pt is intact") and "\n" not in message
    needed, free = needed_and_free(message)
    assert needed == size  # the same tensors: the same size, to the byte
    assert abs(free - shutil.disk_usage(tmp_path).free) < 2 ** 26
    assert raised.value.__suppress_context__  # shown alone, not after torch's "unexpected pos"
    assert checkpoint.load(str(path))["step"] == 10
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left


def test_other_files_and_other_errors(tmp_path, full_disk):
    full_disk("config.json", 10)
    with pytest.raises(checkpoint.DiskFullError, match=r"config.json: no space left on the device for this file: "
                       r"it needs 1[0-9] bytes, [\d,]+ bytes are free there; no config.json was written"):
        checkpoint.write_json(str(tmp_path / "config.json"), {"a": 1})
    full_disk("quota.json", 0, error=errno.EDQUOT)
    with pytest.raises(checkpoint.DiskFullError):
        checkpoint.write_json(str(tmp_path / "quota.json"), {"a": 1})
    full_disk("broken.json", 0, error=errno.EIO)  # not a full disk: the error as it was
    with pytest.raises(OSError) as raised:
        checkpoint.write_json(str(tmp_path / "broken.json"), {"a": 1})
    assert raised.value.errno == errno.EIO and not isinstance(raised.value, checkpoint.DiskFullError)
    assert os.listdir(tmp_path) == []


def test_the_writer_raises_a_failed_job_at_the_next_check_and_does_not_wait_for_a_running_one():
    writer = checkpoint.Writer()
    try:
        release = threading.Event()
        writer.submit(release.wait)
        start = time.monotonic()
        writer.check()  # running: returns at once
        assert time.monotonic() - start < 0.5
        release.set()

        def fail():
            raise checkpoint.DiskFullError("full")
        writer.submit(fail)
        while not writer.pending.done():
            time.sleep(0.01)
        with pytest.raises(checkpoint.DiskFullError):
            writer.check()
        writer.check()  # raised once
    finally:
        writer.close()


def test_a_run_stops_at_the_step_after_a_full_disk_with_one_line_on_stderr(tmp_path, full_disk, monkeypatch, capsys):
    out = tmp_path / "run"
    failed, step_starts = [], []
    original_save, original_gradients = checkpoint.save, TrainStep.gradients

    def save(path, state):
        try:
            original_save(path, state)
        except checkpoint.DiskFullError:
            failed.append(time.monotonic())
            raise

    def gradients(self, *args, **kwargs):
        step_starts.append(time.monotonic())
        return original_gradients(self, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(TrainStep, "gradients", gradients)
    full_disk("checkpoint.pt", 4096, first=2)  # step 0's checkpoint fits, step 3's does not
    status = train_command(SMALL + ["--width", "0.25", "--steps", "30", "--log-every", "1", "--sample-every", "100",
                                    "--checkpoint-every", "3", "--device", "cpu", "--out", str(out)], prog="train.py")
    stderr = capsys.readouterr().err
    assert status == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"train.py: error: {out / 'checkpoint.pt'}: no space left "
                                                     "on the device for the checkpoint of step 3: "), stderr[-2000:]
    assert NEEDED_AND_FREE.search(errors[0])
    # the loop checks before every step: at most the step that began as the write failed ran after it
    assert len(failed) == 1 and sum(t > failed[0] for t in step_starts) <= 1, (failed, step_starts)
    assert len(step_starts) < 30
    assert checkpoint.load(str(out))["step"] == 0
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


@pytest.fixture
def full_appends(monkeypatch):
    """full_appends(prefix, room): appends to the files whose names start with `prefix` have `room` bytes of
    space between them, from now on."""
    def fill(prefix, room):
        left = [room]

        def open_for_append(path, mode="r", *args, **kwargs):
            if mode == "ab" and os.path.basename(path).startswith(prefix):
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                filled = FilledFile(fd, left[0], errno.ENOSPC)
                original_write = filled.write

                def write(data):
                    n = original_write(data)
                    left[0] -= n
                    return n
                filled.write = write
                return io.BufferedWriter(filled)
            return open(path, mode, *args, **kwargs)
        monkeypatch.setattr(checkpoint, "open", open_for_append, raising=False)
    return fill


def test_an_append_that_does_not_fit_is_one_error_and_leaves_the_file_as_it_was(tmp_path, full_appends):
    path = tmp_path / "metrics.jsonl"
    checkpoint.append_whole(str(path), b'{"step": 1}\n', "the metrics of step 1")
    full_appends("metrics.jsonl", 5)  # room for part of the next line
    with pytest.raises(checkpoint.DiskFullError) as raised:
        checkpoint.append_whole(str(path), b'{"step": 2}\n', "the metrics of step 2")
    message = str(raised.value)
    assert message.startswith(f"{path}: no space left on the device for the metrics of step 2: ")
    assert needed_and_free(message)[0] == 12 and "\n" not in message and raised.value.__suppress_context__
    assert path.read_bytes() == b'{"step": 1}\n'  # the torn part is cut off: every line still reads


@pytest.mark.slow
@pytest.mark.parametrize("file", ["metrics.jsonl", "events.out.tfevents"])
def test_a_run_stops_at_a_log_step_whose_records_do_not_fit_with_one_line_and_a_loadable_checkpoint(
        tmp_path, full_appends, monkeypatch, capsys, file):
    from vaegan import runlog
    out = tmp_path / "run"
    original_step = runlog.RunLog.step

    def step(self, step, *args):
        if step == 4:  # after step 3's checkpoint
            full_appends(file, 0)
        return original_step(self, step, *args)
    monkeypatch.setattr(runlog.RunLog, "step", step)
    status = train_command(SMALL + ["--width", "0.25", "--steps", "30", "--log-every", "1", "--sample-every", "100",
                                    "--checkpoint-every", "3", "--device", "cpu", "--out", str(out)], prog="train.py")
    stderr = capsys.readouterr().err
    assert status == 2 and "Traceback" not in stderr and "Exception" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and NEEDED_AND_FREE.search(errors[0]), stderr[-2000:]
    what = "the metrics of step 4" if file == "metrics.jsonl" else "the TensorBoard events of step 4"
    assert errors[0].startswith("train.py: error: ") and f": no space left on the device for {what}: " in errors[0]
    assert file in errors[0]
    assert checkpoint.load(str(out))["step"] == 3
    with open(out / "metrics.jsonl") as f:  # a resume drops the lines after its checkpoint's step
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3] + ([] if file == "metrics.jsonl" else [4])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("kl")] == [1, 2, 3]
