"""The loop with nothing between its steps: decisions on the device, masked optimizer steps, the
non-finite guard, noise drawn on the device, and no device-to-host read between log steps."""
import copy
import importlib
import itertools
import json
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import philox
from datagen import make_celeba
from test_train_step import optimizers
from test_gradients import NOISE_SEED, make
from vaegan import checkpoint, options, trainer
from vaegan.config import TrainConfig
from vaegan.optimizers import make_optimizer, masked_step
from vaegan.train_step import StepMode, TrainStep
from vaegan.decisions import equilibrium_decisions, equilibrium_masks
from vaegan.gradients import UpdateConfig

TINY = dict(image_size=32, latent_size=16, fc_width=64, batch_size=8, workers=0, device="cpu")


def optimizer_state(opt):
    """Every state tensor, with the state a first step creates counted as zeros before it."""
    return {(i, k): v.clone() for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            for k, v in opt.state[p].items() if torch.is_tensor(v)}


def assert_same_state(a, b):
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        va = torch.zeros_like(vb) if va is None else va
        vb = torch.zeros_like(va) if vb is None else vb
        assert torch.equal(va, vb), key


@pytest.mark.parametrize("kind,impl", [("rmsprop", "foreach"), ("rmsprop", "for-loop"), ("adam", "foreach")])
def test_masked_steps_are_bit_identical_to_skipping_on_the_host(kind, impl):
    # the host-side rule is the reference: a skipped optimizer does not run at all
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    reference = copy.deepcopy(net)
    make_opt = lambda n: optimizers(type("M", (), {"networks": lambda self: {"n": n}})(), impl, kind=kind)["n"]  # noqa: E731
    opt, ref_opt = make_opt(net), make_opt(reference)
    pattern = [False, False, True, False, True, True, False, True, False, False, True]  # skips before the first step too
    for i, update in enumerate(pattern * 2):
        x = torch.randn(4, 7, dtype=torch.float64)
        for model in (net, reference):
            model.zero_grad()
            model(x).pow(2).sum().backward()
        masked_step(opt, torch.tensor(update))
        if update:
            ref_opt.step()
        for p, q in zip(net.parameters(), reference.parameters()):
            assert torch.equal(p, q), (i, update)
        assert_same_state(optimizer_state(opt), optimizer_state(ref_opt))


def test_the_equilibrium_rule_on_the_device_is_the_host_rule():
    # float32 costs, as the step computes them; the boundaries 0.68 -/+ 0.35 and their neighbours
    costs = [0.0, 0.2, 0.33, 0.3301, 0.5, 0.68, 1.0, 1.03, 1.0301, 2.0, 9.0]
    costs = [float(torch.tensor(c).nextafter(torch.tensor(d))) for c in costs for d in (-1.0, 0.0, 1.0)]
    for kind, equilibrium in [("vaegan", True), ("vaegan", False), ("vae-disl", True), ("gan", True), ("vae", True)]:
        cfg = UpdateConfig(kind=kind, equilibrium=equilibrium)
        for real, fake in itertools.product(costs, costs):
            dec, dis = equilibrium_masks(cfg, torch.tensor(real), torch.tensor(fake))
            assert (bool(dec), bool(dis)) == equilibrium_decisions(cfg, real, fake), (kind, real, fake)


def test_a_step_with_non_finite_gradients_updates_nothing():
    model, x, _, z_prior = make("vaegan", seed=5, dtype=torch.float32)
    step = TrainStep(model, optimizers(model), UpdateConfig(gamma=1e-3), None, StepMode())
    for _ in range(2):  # optimizer state exists
        stats = step.gradients(x, z_prior, NOISE_SEED)
        update, finite = step.decisions(stats)
        step.apply({name: torch.ones((), dtype=torch.bool) for name in update})
    params = [p.detach().clone() for p in model.parameters()]
    states = {n: optimizer_state(o) for n, o in step.optimizers.items()}
    stats = step.gradients(x, z_prior, NOISE_SEED)
    next(model.decoder.parameters()).grad[0].fill_(float("nan"))  # one gradient element
    update, finite = step.decisions(stats)
    assert not finite and not any(bool(u) for u in update.values())
    step.apply(update)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for name, opt in step.optimizers.items():
        assert_same_state(optimizer_state(opt), states[name])
    stats = step.gradients(x, z_prior, NOISE_SEED)
    stats["llike"] = stats["llike"] * float("inf")  # a loss
    assert not step.decisions(stats)[1]


def test_a_non_finite_step_stops_the_run_at_the_log_step_naming_it(tmp_path, monkeypatch):
    bad_step = 6
    original = TrainStep.gradients
    calls = itertools.count()

    def gradients(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        if next(calls) == bad_step:
            next(self.model.encoder.parameters()).grad.view(-1)[0] = float("nan")
        return stats

    monkeypatch.setattr(TrainStep, "gradients", gradients)
    cfg = TrainConfig(steps=20, log_every=8, checkpoint_every=4, sample_every=100, out=str(tmp_path / "run"), **TINY)
    with pytest.raises(FloatingPointError, match=f"step {bad_step}: loss became non-finite"):
        trainer.train(cfg)
    saved = checkpoint.load(str(tmp_path / "run"))
    assert saved["step"] == 4  # the checkpoint of step 8 was refused, the one before is intact
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


def test_prior_codes_are_drawn_on_the_device_from_seed_and_step_and_split_across_ranks():
    step = torch.tensor([7])
    seed, whole = philox.step_noise(3, step, 8, 5, 8)
    for ranks in (2, 4):
        rows = 8 // ranks
        parts = [philox.step_noise(3, step, rows, 5, 8, r * rows) for r in range(ranks)]
        assert all(torch.equal(s, seed) for s, _ in parts)
        assert torch.equal(torch.cat([z for _, z in parts]), whole)
    # the same stream as the reparameterisation noise, past its rows
    assert torch.equal(whole, philox.rows_randn(seed, 8, 5, 8))
    assert not torch.equal(philox.step_noise(3, torch.tensor([8]), 8, 5, 8)[1], whole)
    assert 0.5 < whole.std() < 1.5


READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy", "cpu")
TORCH = os.path.dirname(torch.__file__) + os.sep
ATEN = torch.ops.aten


def caller_frame():
    """The nearest frame outside torch and this file: whose call it is."""
    frame = sys._getframe(1)
    while frame is not None and (TORCH in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame


def caller():
    frame = caller_frame()
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"


# Functions that read tensors of a CPU generator, in host memory whatever the device (the meta runs
# below see them as host tensors): on a CPU run, where the host is the device, their reads are not counted.
HOST_ONLY = {("loader.py", "epoch_order")}


def on_host(tensor_or_device):
    device = getattr(tensor_or_device, "device", tensor_or_device)
    return torch.device(device).type == "cpu"


class HostTraffic(TorchDispatchMode):
    """Counts, per step, what makes the host wait for the device or copies to it, by kind:
      reads     a tensor's value copied to the host: the READS methods, a device-to-host copy;
      pageable  a copy from host memory to the device that is not a pinned non_blocking copy: .to(),
                copy_, a host tensor (more than a scalar) handed to an operation on device tensors (the
                copy hidden in it), torch.tensor / as_tensor(data, device=...), a device tensor indexed
                with a Python list or an array;
      pinned    a non_blocking copy from pinned host memory: a loader's own batch copy, counted apart.
    `step` is the step whose batch is being fetched or trained (stepped() advances it as a loader
    yields), so a batch's loading counts in its own step.

    With `device` "meta" the host is the CPU and the device is not: every count is exact, and the
    CUDA-only branches (pinning, non_blocking copies) run. CPU-only builds cannot pin, so pin_memory is
    stood in for (a copy remembered as pinned) and the DataLoader is told an accelerator exists. With
    `device` "cpu" (a CPU run of the loop) the host is the device: every tensor counts for reads, and a
    transfer cannot be seen (the meta runs count those)."""

    def __init__(self, monkeypatch, device):
        super().__init__()
        self.device = torch.device(device)
        self.step = -1
        self.counts = {"reads": {}, "pageable": {}, "pinned": {}}
        self.pinned_storages, self.keep = set(), []  # keep: the pinned stand-ins, so that no address is reused
        self.reading = False
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self.counting_read(name))
        if not on_host(self.device):
            self.patch_transfers(monkeypatch)

    def count(self, kind, what):
        self.counts[kind].setdefault(self.step, []).append(f"{what} in {caller()}")

    def of(self, kind, steps):
        return {s: v for s, v in self.counts[kind].items() if s in steps}

    def stepped(self, loader):
        iterator = iter(loader)
        while True:
            self.step += 1
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch

    def host_only(self):
        frame = caller_frame()
        return (on_host(self.device) and frame is not None and
                (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name) in HOST_ONLY)

    def pinned(self, tensor):
        return tensor.untyped_storage().data_ptr() in self.pinned_storages

    def is_device_tensor(self, tensor):
        return on_host(self.device) or not on_host(tensor)

    def counting_read(self, name):
        method = getattr(torch.Tensor, name)
        traffic = self

        def read(self, *args, **kwargs):
            if traffic.reading:
                return method(self, *args, **kwargs)
            if traffic.is_device_tensor(self) and not traffic.host_only():
                traffic.count("reads", name)
            traffic.reading = True  # the dispatcher's view of the same read is not counted again
            try:
                return method(self, *args, **kwargs)
            finally:
                traffic.reading = False
        return read

    def patch_transfers(self, monkeypatch):
        traffic, tensor, as_tensor = self, torch.tensor, torch.as_tensor
        getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__

        def from_data(make):
            def made(data, *args, device=None, **kwargs):
                if device is not None and not on_host(device) and not (torch.is_tensor(data) and not on_host(data)):
                    traffic.count("pageable", f"{make.__name__}(data, device={device})")
                return make(data, *args, device=device, **kwargs)
            return made

        def host_index(index):
            parts = index if isinstance(index, tuple) else (index,)
            return any(isinstance(part, (list, np.ndarray)) for part in parts)

        def indexed(method):
            def index(self, key, *args):
                if not on_host(self) and host_index(key):
                    traffic.count("pageable", "a device tensor indexed with a host list")
                return method(self, key, *args)
            return index

        def pin_memory(self, *args, **kwargs):  # what a pinned copy would be, without a pinned allocator
            pinned = self.clone()
            traffic.pinned_storages.add(pinned.untyped_storage().data_ptr())
            traffic.keep.append(pinned)
            return pinned

        monkeypatch.setattr(torch, "tensor", from_data(tensor))
        monkeypatch.setattr(torch, "as_tensor", from_data(as_tensor))
        monkeypatch.setattr(torch.Tensor, "__getitem__", indexed(getitem))
        monkeypatch.setattr(torch.Tensor, "__setitem__", indexed(setitem))
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: on_host(self) and traffic.pinned(self))
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # the DataLoader pins
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: self.device)
        monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
        monkeypatch.setattr(torch.accelerator, "set_device_index", lambda index: None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (ATEN._to_copy.default, ATEN.copy_.default):
            if func is ATEN._to_copy.default:
                source, target = args[0], kwargs.get("device") or args[0].device
                non_blocking = kwargs.get("non_blocking", False)
            else:
                source, target = args[1], args[0].device
                non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if on_host(source) and not on_host(target):
                pinned = non_blocking and self.pinned(source)
                self.count("pinned" if pinned else "pageable", f"{func} of {tuple(source.shape)}")
            elif not on_host(source) and on_host(target) and not self.reading:
                self.count("reads", f"{func} of {tuple(source.shape)}")
        elif func is ATEN._local_scalar_dense.default:
            if not on_host(args[0]) and not self.reading:
                self.count("reads", str(func))
        else:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if any(not on_host(t) for t in tensors) and any(on_host(t) and t.dim() > 0 for t in tensors):
                self.count("pageable", f"a host tensor handed to {func}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_the_steps_between_log_steps_read_nothing_from_the_device(tmp_path, monkeypatch, compiled):
    """Counts every call that copies a tensor's value to the host, per step, the data path's included.
    On a GPU the same loop runs under torch.cuda.set_sync_debug_mode("error") (tests below). The CPU's
    own shortcut (decisions read from host memory) is off here: this CPU run stands in for the device's
    path. The host is the device here, so transfers are counted on the meta device (test below)."""
    monkeypatch.setattr(TrainStep, "read_cpu_decisions", False)
    traffic = HostTraffic(monkeypatch, "cpu")
    open_loader = trainer.open_loader

    def counted_loader(*args, **kwargs):
        loader, *rest = open_loader(*args, **kwargs)
        return (traffic.stepped(loader), *rest)

    monkeypatch.setattr(trainer, "open_loader", counted_loader)
    cfg = TrainConfig(steps=15, log_every=5, checkpoint_every=100, sample_every=100, keep_every=100,
                      compile=compiled, compile_backend="aot_eager", out=str(tmp_path / "run"), **TINY)
    trainer.train(cfg)
    assert traffic.step == 15  # 15 batches, and the end of the loader
    # steps are numbered from 0: step 4, 9 and 14 are log steps (the 5th, 10th and 15th)
    assert traffic.of("reads", {4})  # the counter counts: a log step reads
    assert not traffic.of("reads", {5, 6, 7, 8, 10, 11, 12, 13}), traffic.counts["reads"]


# Pinned non_blocking copies a loader makes per batch: the uint8 images where they are not on the device
# already, and the labels (rows, flips) of loader.labels_of; the built-in faces' DataLoader hands its
# pinned batch to the step, which copies the images. DALI copies to the device itself (images and labels
# come out of its pipeline on the GPU).
PINNED_PER_BATCH = {"faces": 1, "pil-workers": 2, "cache-host": 2, "cache-gpu": 1, "dali": 0}
META_STEPS = 4  # 3 steps an epoch: step 3 starts the second epoch (a new order, drawn on the host)


def meta_loader(path, dataset, sampler, monkeypatch):
    """`path`'s loader with the meta device standing for the GPU."""
    from vaegan.data import make_loader
    from vaegan.data.cache import CachedLoader, DecodedCache
    from vaegan.data.loader import DeviceBatch
    meta = torch.device("meta")
    if path == "faces":
        return make_loader(dataset, sampler, 0, pin_memory=True, device=meta)
    if path == "pil-workers":
        return make_loader(dataset, sampler, 1, device=meta)  # a worker decodes, the pinning thread pins
    if path == "cache-host":
        return CachedLoader(DecodedCache.decode(dataset, "host", "cpu", progress=False), dataset, sampler, meta)
    if path == "cache-gpu":  # the decoded images on the device (their values do not matter on meta)
        images = torch.empty((len(dataset), *dataset.decoded_shape()), dtype=torch.uint8, device=meta)
        cache = DecodedCache(images, torch.arange(len(dataset)), [()] * len(dataset), 0.0)
        return CachedLoader(cache, dataset, sampler, meta)
    from vaegan.data.dali import DaliLoader
    loader = DaliLoader(dataset, sampler.batch_size, 0, 1, sampler.seed, 0, sampler.end_step, sampler.flip)
    # On CUDA DALI's output is on the device and copied there into torch's memory on torch's stream
    # (_fetch); here its CPU output is replaced by device tensors of the same shape
    loader.target_device, loader.finish = meta, DeviceBatch(dataset, meta)
    monkeypatch.setattr(loader, "_fetch", lambda dense, dtype: torch.empty(dense.shape(), dtype=dtype, device=meta))
    return loader


def meta_step(dataset, channels, conditional):
    """The trainer's step (trainer.build_step) on the meta device, with its optimizers' state on the
    device as on CUDA (capturable: torch's optimizers allow that on meta only when told it is supported)."""
    names = ",".join(dataset.attribute_names) if conditional else None
    cfg = TrainConfig(model="cvaegan" if conditional else "vaegan", attributes=names, image_size=32,
                      channels=channels, latent_size=16, fc_width=64, width=0.25, batch_size=4,
                      precision="fp32", kernels="torch", compile=False, cuda_graphs=False).resolved()
    columns = list(range(len(dataset.attribute_names))) if conditional else None
    model, opts, step = trainer.build_step(cfg, torch.device("meta"), attribute_columns=columns)
    for opt in opts.values():
        for group in opt.param_groups:
            group["capturable"] = True
    return cfg, opts, step


@pytest.mark.slow
@pytest.mark.parametrize("path,augment,conditional", [
    ("faces", "flip", False),
    *[(path, augment, False) for path in ("pil-workers", "cache-host", "cache-gpu", "dali")
      for augment in ("authors", "flip", "none")],
    *[(path, "authors", True) for path in ("pil-workers", "cache-host", "cache-gpu", "dali")]])
def test_steady_steps_copy_nothing_from_pageable_memory_and_read_nothing_on_every_loader(
        tmp_path, monkeypatch, path, augment, conditional):
    """Each loader's data path and the step, with the meta device standing for the GPU (the CUDA
    branches run; values are not computed): from the second step on, no copy from pageable host
    memory to the device and no read of a device tensor; the pinned non_blocking copies are the
    loader's own, at most PINNED_PER_BATCH a batch. The first step builds what is kept on the device
    (the low-pass and resize matrices) and is not counted."""
    from vaegan.data import StepBatchSampler, build_dataset
    from vaegan.gradients import STEP_STATS
    from vaegan.optimizers import follow_schedule
    from vaegan.tally import StepTally
    if path == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    for module in map(importlib.import_module, ("torch.optim.optimizer", "torch.optim.rmsprop", "torch.optim.adam")):
        supported = module._get_capturable_supported_devices
        monkeypatch.setattr(module, "_get_capturable_supported_devices",
                            lambda supports_xla=True, supported=supported: [*supported(supports_xla), "meta"])
    channels = 1 if path == "faces" else 3
    if path == "faces":
        dataset = build_dataset("builtin:faces", "train", 32, channels)
    else:
        make_celeba(tmp_path / "data", n=16)  # 12 training images: 3 steps of 4 an epoch
        dataset = build_dataset(str(tmp_path / "data"), "train", 32, channels)
        dataset.augment = augment == "authors"
    cfg, opts, step = meta_step(dataset, channels, conditional)
    sampler = StepBatchSampler(len(dataset), 4, 0, 1, 7, 0, META_STEPS, flip=augment != "none")
    loader = meta_loader(path, dataset, sampler, monkeypatch)
    tally = StepTally(torch.device("meta"), STEP_STATS, {"decoder": 0, "discriminator": 0})
    traffic = HostTraffic(monkeypatch, "meta")
    with traffic:
        for images, attributes, _ in traffic.stepped(loader):
            assert images.shape == (4, channels, 32, 32)
            assert images.device.type == "meta" or (path == "faces" and images.is_pinned())  # the step copies those
            tally.add(step(images, attributes, traffic.step))
            follow_schedule(opts, cfg, traffic.step + 1)
    steady = set(range(1, META_STEPS))
    assert traffic.step == META_STEPS
    assert not traffic.of("pageable", steady), traffic.counts["pageable"]
    assert not traffic.of("reads", steady), traffic.counts["reads"]
    pinned = traffic.of("pinned", steady)
    assert all(len(pinned.get(s, [])) <= PINNED_PER_BATCH[path] for s in steady), pinned
    if PINNED_PER_BATCH[path]:
        assert all(len(pinned.get(s, [])) == PINNED_PER_BATCH[path] for s in steady), pinned


def test_the_host_traffic_counter_sees_each_kind_of_transfer_and_read(monkeypatch):
    """What the meta runs above must not contain, each counted: a pageable copy, data made on the
    device from a Python list (invisible to the dispatcher), a device tensor indexed with a list (as
    `attributes[:, columns]` did), a host tensor handed to a device operation, and a read; a pinned
    non_blocking copy is counted apart."""
    traffic = HostTraffic(monkeypatch, "meta")
    device_tensor = torch.empty(4, 3, device="meta")
    with traffic:
        traffic.step = 0
        torch.arange(3).to("meta")
        torch.tensor([0, 2], device="meta")
        device_tensor[:, [0, 2]]
        device_tensor.index_select(1, torch.arange(2))
        torch.arange(3).pin_memory().to("meta", non_blocking=True)
        torch.arange(3).pin_memory().to("meta")  # pinned, but waits
        with pytest.raises(Exception):
            device_tensor.sum().item()
    assert len(traffic.counts["pageable"][0]) == 5, traffic.counts
    assert len(traffic.counts["pinned"][0]) == 1 and len(traffic.counts["reads"][0]) == 1, traffic.counts


def train_with_sync_errors(monkeypatch, cfg):
    """trainer.train(cfg) with every synchronisation an error from the 6th step on, except around the
    log steps (every 5th: the step before one and the one after it read or load under no check)."""
    original = TrainStep.gradients
    current = {"step": -1}

    def gradients(self, *args, **kwargs):
        current["step"] += 1
        torch.cuda.set_sync_debug_mode("error" if current["step"] % 5 not in (0, 4) and current["step"] > 4 else 0)
        return original(self, *args, **kwargs)

    original_trial = TrainStep.compile_now

    def compile_now(self, *args, **kwargs):  # the compile trial before the first step: not a step
        failure = original_trial(self, *args, **kwargs)
        current["step"] = -1
        return failure

    monkeypatch.setattr(TrainStep, "gradients", gradients)
    monkeypatch.setattr(TrainStep, "compile_now", compile_now)
    try:
        trainer.train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert current["step"] == cfg.steps - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU count above covers the CPU)")
@pytest.mark.parametrize("fast", [False, True], ids=["eager", "compiled-cuda-graphs"])
def test_on_a_gpu_the_steps_between_log_steps_never_synchronise(tmp_path, monkeypatch, fast):
    cfg = TrainConfig(steps=15, log_every=5, checkpoint_every=100, sample_every=100, keep_every=100,
                      compile=fast, cuda_graphs=fast, out=str(tmp_path / "run"),
                      **{**TINY, "device": "cuda", "loader": "pil"})
    train_with_sync_errors(monkeypatch, cfg)


GPU_LOADERS = {"cache-gpu": dict(data_cache="gpu"), "cache-host": dict(data_cache="host"),
               "pil-workers": dict(loader="pil", data_cache="none", workers=2),
               "dali": dict(loader="dali", data_cache="none")}


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the meta-device count above covers the CPU)")
@pytest.mark.parametrize("path,conditional", [*[(path, False) for path in GPU_LOADERS],
                                              ("cache-gpu", True), ("pil-workers", True), ("dali", True)])
def test_on_a_gpu_every_loader_through_files_never_synchronises(tmp_path, monkeypatch, path, conditional):
    """CelebA-layout JPEGs on disk, the authors' augmentation, each loader and cache, the run's default
    step on CUDA (compiled, CUDA graphs), a conditional model too: steady steps under
    set_sync_debug_mode("error"). 48 training images in batches of 8: epochs end inside the checked steps."""
    from vaegan.data.dali import dali_unavailable_reason
    if path == "dali" and dali_unavailable_reason():
        pytest.skip(dali_unavailable_reason())
    make_celeba(tmp_path / "data", n=64)
    cfg = TrainConfig(data=str(tmp_path / "data"), steps=15, log_every=5, checkpoint_every=100, sample_every=100,
                      keep_every=100, augment="authors", model="cvaegan" if conditional else "vaegan",
                      image_size=32, latent_size=16, fc_width=64, width=0.25, batch_size=8, device="cuda",
                      out=str(tmp_path / "run"), **{"workers": 0, **GPU_LOADERS[path]})
    train_with_sync_errors(monkeypatch, cfg)
    with open(tmp_path / "run" / "config.json") as f:
        used = json.load(f)
    assert used["augment"] == "authors" and used["data_cache"] == GPU_LOADERS[path]["data_cache"]
    assert used["loader"] == ("dali" if path == "dali" else "pil")


def test_precision_auto_is_bf16_where_the_device_has_bf16_and_fp32_elsewhere(monkeypatch):
    monkeypatch.setattr(options, "cpu_has_native_bf16", lambda: False)
    assert options.resolve_precision(torch.device("cpu"))[0] == "fp32"
    monkeypatch.setattr(options, "cpu_has_native_bf16", lambda: True)
    assert options.resolve_precision(torch.device("cpu")) == ("bf16", "auto: this CPU has bf16 instructions")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert options.resolve_precision(torch.device("cuda", 0))[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert options.resolve_precision(torch.device("cuda", 0))[0] == "fp32"


@pytest.mark.slow
def test_the_loop_does_not_wait_for_a_slow_checkpoint_writer(tmp_path, monkeypatch):
    import time
    original_save, original_gradients = checkpoint.save, TrainStep.gradients
    writes, steps = [], []

    def slow_save(path, state):
        start = time.monotonic()
        time.sleep(3.0)
        original_save(path, state)
        writes.append((start, time.monotonic(), state["step"]))

    def gradients(self, *args, **kwargs):
        steps.append(time.monotonic())
        return original_gradients(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    monkeypatch.setattr(TrainStep, "gradients", gradients)
    cfg = TrainConfig(steps=12, log_every=4, checkpoint_every=6, sample_every=100, out=str(tmp_path / "run"), **TINY)
    trainer.train(cfg)
    assert [step for _, _, step in writes] == [0, 6, 12]  # the last one finished before train() returned
    start, end, _ = writes[1]
    assert sum(start < t < end for t in steps) >= 2, (writes, steps)  # steps ran while step 6 was written
    assert checkpoint.load(str(tmp_path / "run"))["step"] == 12


KILLED_MID_WRITE = """
import os, sys, time
from vaegan import checkpoint, options, trainer
from vaegan.config import TrainConfig
real = checkpoint.atomic_write

def hanging(path, write, *args):  # every rewrite of checkpoint.pt after the first stops half-way
    if path.endswith("checkpoint.pt") and os.path.exists(path):
        def half(f):
            f.write(b"half a checkpoint")
            f.flush()
            time.sleep(600)
        return real(path, half, *args)
    return real(path, write, *args)

checkpoint.atomic_write = hanging
trainer.train(TrainConfig(steps=40, log_every=2, checkpoint_every=2, checkpoint_minutes=0, out=sys.argv[1],
                          image_size=32, latent_size=16, fc_width=64, batch_size=8, workers=0, device="cpu"))
"""


@pytest.mark.slow
def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    import signal
    import subprocess
    import time
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    process = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and any(p.name.endswith(".tmp") for p in out.iterdir())):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)  # the loop goes on meanwhile
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    saved = checkpoint.load(str(out))
    assert saved["step"] == 0 and saved["config"]["checkpoint_every"] == 2


@pytest.mark.slow
def test_checkpoints_follow_the_minutes_at_log_steps_and_the_step_count(tmp_path, monkeypatch):
    saved_steps = []
    original = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda path, state: (saved_steps.append(state["step"]),
                                                                  original(path, state)))
    common = dict(steps=10, log_every=3, sample_every=100, **TINY)
    trainer.train(TrainConfig(checkpoint_minutes=1e-9, out=str(tmp_path / "minutes"), **common))
    assert saved_steps == [0, 3, 6, 9, 10]  # due at every log step, and the end
    saved_steps.clear()
    trainer.train(TrainConfig(checkpoint_minutes=0, checkpoint_every=4, out=str(tmp_path / "steps"), **common))
    assert saved_steps == [0, 4, 8, 10]
    saved_steps.clear()
    trainer.train(TrainConfig(out=str(tmp_path / "default"), **common))  # 10 minutes: only the start and the end
    assert saved_steps == [0, 10]


def test_skip_counts_are_exact_whatever_the_log_interval(tmp_path):
    runs = {}
    for every in (1, 5):
        out = tmp_path / f"every{every}"
        trainer.train(TrainConfig(steps=10, log_every=every, sample_every=100, out=str(out), **TINY))
        with open(out / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        runs[every] = records
        total = {n: sum(r[f"skipped_{n}"] for r in records) for n in ("decoder", "discriminator")}
        assert checkpoint.load(str(out))["skips"] == total
    every_step = runs[1]
    for record in runs[5]:  # the same trajectory: the 5-step lines sum the 1-step lines
        window = [r for r in every_step if record["step"] - 5 < r["step"] <= record["step"]]
        for n in ("decoder", "discriminator"):
            assert record[f"skipped_{n}"] == sum(not r[f"update_{n}"] for r in window)
    assert sum(r["skipped_discriminator"] + r["skipped_decoder"] for r in every_step) > 0  # the rule did skip


def test_grids_are_encoded_without_torch_operations():
    # grids are encoded on the writer's thread: a torch operation there starts a second team of
    # intra-op threads, which slowed every later CPU step by 30% (seen with bench/test_loop.py)
    from torch.overrides import TorchFunctionMode

    from vaegan.images import grid

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    images = torch.rand(5, 3, 8, 8) * 2 - 1
    with Calls() as calls:
        canvas = grid(images, columns=4)
    assert set(calls.names) <= {"detach", "__get__", "numpy"}, calls.names
    assert canvas.shape == (2 * 10 + 2, 4 * 10 + 2, 3)
    want = ((images[1] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (canvas[2:10, 12:20] == want).all()  # the second image, in the first row


@pytest.mark.slow
def test_masked_steps_compiled_by_inductor_follow_the_host_rule():
    # inductor's generated code (C++ on a CPU) for the masked update, on gradients given to both;
    # the tensor learning rate is a float32 (1e-3 * (1 + 5e-8)): agreement to 1e-7, not bit for bit
    import functools
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).double()
    reference = copy.deepcopy(net)
    host = make_optimizer("rmsprop", "foreach", [{"params": list(reference.parameters()), "weight_decay": 1e-5}],
                          1e-3, False)
    device = make_optimizer("rmsprop", "foreach", [{"params": list(net.parameters()), "weight_decay": 1e-5}],
                            1e-3, True)
    compiled = torch.compile(functools.partial(masked_step, device))
    for update in (True, False, True, True, False, True):
        for p, q in zip(reference.parameters(), net.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        if update:
            host.step()
        compiled(torch.tensor(update))
        for p, q in zip(reference.parameters(), net.parameters()):
            assert (p - q).abs().max() <= 1e-7 * p.abs().max()


def test_on_a_cpu_the_optimizers_step_or_skip_plainly(monkeypatch):
    # the decisions are in host memory: no masked step (no copies of parameters and state) runs
    model, x, _, z_prior = make("vaegan", seed=3, dtype=torch.float32)
    opts = {n: make_optimizer("rmsprop", "foreach", [{"params": list(net.parameters())}], 1e-3, False)
            for n, net in model.networks().items()}
    step = TrainStep(model, opts, UpdateConfig(gamma=1e-3), None, StepMode())
    masked = []
    step.masked_steps = {name: lambda keep, name=name: masked.append(name) for name in opts}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step.gradients(x, z_prior, 5)
    no = torch.tensor(False)
    step.apply({"encoder": torch.tensor(True), "decoder": no, "discriminator": no})
    assert not masked
    moved = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"encoder"}
    monkeypatch.setattr(TrainStep, "read_cpu_decisions", False)
    step.apply({"encoder": no, "decoder": no, "discriminator": no})
    assert sorted(masked) == ["decoder", "discriminator", "encoder"]
