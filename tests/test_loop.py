"""The loop with nothing between its steps: decisions on the device, masked optimizer steps, the
non-finite guard, noise drawn on the device, and no device-to-host read between log steps."""
import copy
import itertools
import json
import os
import sys

import pytest
import torch

from kernels import philox
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


READS = ("item", "__float__", "__bool__", "__int__", "tolist", "numpy", "cpu")
TORCH = os.path.dirname(torch.__file__) + os.sep


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_steps_between_log_steps_read_nothing_from_the_device(tmp_path, monkeypatch, compiled):
    """Counts every call that copies a tensor's value to the host, per step. On a GPU the same
    loop runs under torch.cuda.set_sync_debug_mode("error") (test below). The CPU's own shortcut
    (decisions read from host memory) is off here: this CPU run stands in for the device's path."""
    monkeypatch.setattr(TrainStep, "read_cpu_decisions", False)
    original = TrainStep.gradients
    current = {"step": -1}
    reads = {}

    def gradients(self, *args, **kwargs):
        current["step"] += 1
        return original(self, *args, **kwargs)

    def counting(name):
        method = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            # past torch's frames and this wrapper's own (a default-device mode calls back through it): whose call?
            while frame is not None and (TORCH in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
                frame = frame.f_back
            caller = frame.f_code.co_filename if frame is not None else "?"
            if os.sep + os.path.join("vaegan", "data") + os.sep not in caller:  # the loader's host-side tensors
                reads.setdefault(current["step"], []).append(f"{name} in {caller}:{frame and frame.f_lineno}")
            return method(self, *args, **kwargs)
        return read

    original_trial = TrainStep.compile_now

    def compile_now(self, *args, **kwargs):  # the compile trial before the first step: not a step
        failure = original_trial(self, *args, **kwargs)
        current["step"] = -1
        reads.clear()
        return failure

    monkeypatch.setattr(TrainStep, "gradients", gradients)
    monkeypatch.setattr(TrainStep, "compile_now", compile_now)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    cfg = TrainConfig(steps=15, log_every=5, checkpoint_every=100, sample_every=100, keep_every=100,
                      compile=compiled, compile_backend="aot_eager", out=str(tmp_path / "run"), **TINY)
    trainer.train(cfg)
    assert current["step"] == 14
    # steps are numbered from 0: step 4, 9 and 14 are log steps (the 5th, 10th and 15th)
    assert reads.get(4)  # the counter counts: a log step reads
    assert not any(reads.get(s) for s in (5, 6, 7, 8, 10, 11, 12, 13)), reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU count above covers the CPU)")
@pytest.mark.parametrize("fast", [False, True], ids=["eager", "compiled-cuda-graphs"])
def test_on_a_gpu_the_steps_between_log_steps_never_synchronise(tmp_path, monkeypatch, fast):
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
    cfg = TrainConfig(steps=15, log_every=5, checkpoint_every=100, sample_every=100, keep_every=100,
                      compile=fast, cuda_graphs=fast, out=str(tmp_path / "run"),
                      **{**TINY, "device": "cuda", "loader": "pil"})
    try:
        trainer.train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_precision_auto_is_bf16_where_the_device_has_bf16_and_fp32_elsewhere(monkeypatch):
    monkeypatch.setattr(options, "cpu_has_native_bf16", lambda: False)
    assert options.resolve_precision(torch.device("cpu"))[0] == "fp32"
    monkeypatch.setattr(options, "cpu_has_native_bf16", lambda: True)
    assert options.resolve_precision(torch.device("cpu")) == ("bf16", "auto: this CPU has bf16 instructions")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert options.resolve_precision(torch.device("cuda", 0))[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert options.resolve_precision(torch.device("cuda", 0))[0] == "fp32"


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
