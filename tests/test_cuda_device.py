"""--device cuda:N on a machine without a GPU: the calls the trainer and the checkpoint writer make to torch.cuda,
mocked and recorded (which, on which device, in which order)."""
import pytest
import torch

from vaegan import checkpoint, options, trainer
from vaegan.config import ConfigError, TrainConfig
from vaegan.distributed import Context


class FirstCreation(Exception):
    """Raised where setup creates its first object: what came before it is what the test looks at."""


@pytest.fixture
def calls(monkeypatch):
    recorded = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: recorded.append(("set_device", torch.device(device))))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)

    def build_dataset(*args, **kwargs):
        recorded.append(("build_dataset",))
        raise FirstCreation
    monkeypatch.setattr(trainer, "build_dataset", build_dataset)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: recorded.append(("manual_seed",)))
    return recorded


@pytest.mark.parametrize("device,ctx,chosen", [
    (torch.device("cuda", 1), Context(), torch.device("cuda", 1)),  # --device cuda:1, one process
    (torch.device("cuda"), Context(), torch.device("cuda", 2)),     # --device cuda: CUDA's current device
    (torch.device("cuda"), Context(rank=3, world_size=4, local_rank=1), torch.device("cuda", 1)),  # torchrun
])
def test_the_training_device_becomes_current_before_anything_is_created(calls, tmp_path, device, ctx, chosen):
    with pytest.raises(FirstCreation):
        trainer.setup(TrainConfig(out=str(tmp_path)), ctx, device, None)
    assert calls == [("set_device", chosen), ("manual_seed",), ("build_dataset",)]


def test_a_cpu_run_makes_no_cuda_call(calls, tmp_path):
    with pytest.raises(FirstCreation):
        trainer.setup(TrainConfig(out=str(tmp_path)), Context(), torch.device("cpu"), None)
    assert calls == [("manual_seed",), ("build_dataset",)]


def test_the_checkpoint_writer_waits_for_the_training_devices_stream(monkeypatch):
    recorded = []

    class Event:
        def record(self, stream=None):
            recorded.append(("record", stream))

        def synchronize(self):
            recorded.append(("synchronize",))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {torch.device(device)}")
    writer = checkpoint.Writer(torch.device("cuda", 1))
    try:
        writer.submit(lambda: recorded.append(("job",)))
        writer.wait()
    finally:
        writer.close()
    assert recorded == [("record", "stream of cuda:1"), ("synchronize",), ("job",)]


def test_a_device_index_the_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert options.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="--device cuda:2: this machine has 2 CUDA device"):
        options.resolve_device("cuda:2")
