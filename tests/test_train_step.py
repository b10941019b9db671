"""The training step (vaegan/train_step.py): every mode gives the reference's gradients and the eager optimizers' steps."""
import copy
import functools
import itertools
import json
import os
import re

import pytest
import torch
import torch.distributed as dist

from conftest import run_train, SMALL
from kernels import philox
from test_gradients import NOISE_SEED, assert_same_grads, grads, make
from vaegan import distributed
from vaegan.config import ConfigError, TrainConfig
from vaegan.distributed import Context, OverlappedGradientReducer
from vaegan.gradients import UpdateConfig, compute_gradients, compute_gradients_reference
from vaegan.gradients import routed_losses as compute_routed
from vaegan.optimizers import FusedMaskedRMSprop, make_optimizer, reset_implementation, set_learning_rate
from vaegan.options import Machine, check, resolve_optimizer_impl
from vaegan.train_step import StepMode, TrainStep

ALL = {"encoder": True, "decoder": True, "discriminator": True}


def optimizers(model, impl="foreach", tensor_lr=False, kind="rmsprop", lr=1e-3):
    return {n: make_optimizer(kind, impl, [{"params": list(net.parameters()), "weight_decay": 1e-5}], lr, tensor_lr)
            for n, net in model.networks().items()}


def reference_grads(model, x, z_prior, cfg, seed, attributes=None):
    eps = philox.rows_randn(seed, x.shape[0], z_prior.shape[1]).to(x.dtype)
    compute_gradients_reference(model, x, eps, z_prior, cfg, attributes)
    return grads(model)


@pytest.mark.slow
@pytest.mark.parametrize("decoder_call", ["separate", "joint"])
def test_compiled_step_with_inductor_gives_the_reference_gradients(decoder_call):
    # Real code generation (inductor's C++ backend on a CPU): the routed backward survives compilation.
    model, x, _, z_prior = make("vaegan", seed=21, dtype=torch.float32)
    cfg = UpdateConfig(gamma=1e-3, decoder_call=decoder_call)
    step = TrainStep(model, optimizers(model, tensor_lr=True), cfg, None, StepMode(compile=True, channels_last=True))
    for seed in (NOISE_SEED, NOISE_SEED + 1):  # a new seed every step: data, not a recompile
        step.gradients(x, z_prior, seed)
        assert_same_grads(grads(model), reference_grads(model, x, z_prior, cfg, seed), rtol=1e-4)


MODES = [StepMode(channels_last=True), StepMode(compile=True, backend="aot_eager"),
         StepMode(compile=True, backend="aot_eager", channels_last=True)]
VARIANTS = [("vaegan", {}), ("vaegan", dict(saturating=False, dis_sees_recon=True)), ("vae", {}), ("gan", {}),
            ("vae-disl", {}), ("cvaegan", {}), ("vaegan", dict(decoder_call="joint")),
            ("cvaegan", dict(decoder_call="joint", saturating=False, dis_sees_recon=True))]


# the fast tier compiles the plain and the most changed variant; the full suite compiles every one
FAST_COMPILED = {0, len(VARIANTS) - 1}


def mode_params():
    return [pytest.param(mode, kind, variant, marks=[pytest.mark.slow] if mode.compile and i not in FAST_COMPILED else [],
                         id=mode.describe().replace(" ", "") + "-" + kind + "-"
                         + ("-".join(f"{k}={variant[k]}" for k in variant) or "default"))
            for i, (kind, variant) in enumerate(VARIANTS) for mode in MODES]


@pytest.mark.parametrize("mode,kind,variant", mode_params())
def test_every_mode_gives_the_reference_gradients(mode, kind, variant):
    names = ["A", "B"] if kind.startswith("c") else ()
    model, x, _, z_prior = make(kind, seed=len(kind), attribute_names=names)
    attributes = (torch.rand(x.shape[0], 2) < 0.5).double() * 2 - 1 if names else None
    cfg = UpdateConfig(kind=kind.removeprefix("c") if names else kind, gamma=1e-3, **variant)
    step = TrainStep(model, optimizers(model, tensor_lr=mode.compile), cfg, None, mode)
    step.gradients(x, z_prior, NOISE_SEED, attributes=attributes)
    assert_same_grads(grads(model), reference_grads(model, x, z_prior, cfg, NOISE_SEED, attributes), rtol=1e-9)


def test_the_fused_kernels_route_exactly_when_compiled():
    if not torch.cuda.is_available():
        # Under the interpreter the kernels are Python functions that dynamo cannot trace; the
        # traced graph is checked in tests/test_kernels.py and this test runs compiled on a GPU.
        pytest.skip("needs a GPU: Triton kernels compile only there")
    model, x, _, z_prior = (t.cuda() for t in make("vaegan", seed=4, dtype=torch.float32))
    cfg = UpdateConfig(gamma=1e-3, kernels="triton")
    step = TrainStep(model, optimizers(model, tensor_lr=True), cfg, None, StepMode(compile=True, channels_last=True))
    for seed in (1, 2):
        step.gradients(x, z_prior, seed)
        assert_same_grads(grads(model), reference_grads(model, x, z_prior, cfg, seed), rtol=1e-3)


@pytest.mark.slow
def test_the_compiled_step_with_fused_bn_relu_gives_the_reference_gradients():
    # --fuse-bn-relu inside a compiled step: inductor with the Triton kernel on a GPU; on a CPU aot_eager with the
    # interpreter's opaque op (its fake and its backward traced); against the unfused reference routing
    from test_gradients import narrow
    from vaegan.fused_layers import fuse_bn_relu
    torch._dynamo.reset()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain, x, _, z_prior = narrow(64, seed=5)
    plain, x, z_prior = plain.to(device), x.to(device), z_prior.to(device)
    fused = copy.deepcopy(plain)
    assert len(fuse_bn_relu(fused)) == 5
    cfg = UpdateConfig(gamma=1e-6)
    mode = StepMode(compile=True, channels_last=True, backend="inductor" if device == "cuda" else "aot_eager")
    step = TrainStep(fused, optimizers(fused, tensor_lr=True), cfg, None, mode)
    # against float64: at these widths the unfused float32 channels-last step on a CPU is 4% off float64 in the
    # decoder's first layers (the contiguous one and the fused one agree with float64 to 1e-5), so it is no reference
    plain, x64, z64 = plain.double(), x.double(), z_prior.double()
    for seed in (NOISE_SEED, NOISE_SEED + 1):
        step.gradients(x, z_prior, seed)
        want = {n: g.float() for n, g in reference_grads(plain, x64, z64, cfg, seed).items()}
        assert_same_grads(grads(fused), want, rtol=1e-3 if device == "cuda" else 1e-4)


@pytest.mark.slow
def test_compiled_masked_optimizer_steps_follow_eager_and_a_new_learning_rate_does_not_recompile():
    torch._dynamo.reset()
    # float64: RMSProp's first steps are nearly sign(gradient) * lr, which float32 rounding of a
    # near-zero gradient can flip (see tests/test_ddp.py)
    eager_model, x, _, z_prior = make("vaegan", seed=8)
    fast_model, _, _, _ = make("vaegan", seed=8)
    cfg = UpdateConfig(gamma=1e-3)
    eager = TrainStep(eager_model, optimizers(eager_model, "for-loop"), cfg, None, StepMode())
    fast = TrainStep(fast_model, optimizers(fast_model, "foreach", tensor_lr=True), cfg, None,
                     StepMode(compile=True, backend="aot_eager"))
    graphs = None
    for i, lr in enumerate((1e-3, 1e-3, 5e-4, 2e-4)):
        set_learning_rate(eager.optimizers, lr)
        set_learning_rate(fast.optimizers, lr)
        update = {**ALL, "decoder": i != 1}  # a skipped decoder update, as the equilibrium rule makes
        for step in (eager, fast):
            step.gradients(x, z_prior, NOISE_SEED + i)
        eager.apply(update)  # the host-side rule: the decoder's optimizer does not run
        fast.apply({name: torch.tensor(value) for name, value in update.items()})  # compiled masked steps
        if i == 1:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # the lr changes recompiled nothing
    start, _, _, _ = make("vaegan", seed=8)
    for (name, p), q, p0 in zip(eager_model.named_parameters(), fast_model.parameters(), start.parameters()):
        moved = (p - p0).norm()
        # the tensor learning rate is a float32 (1e-3 in float32 is 1e-3 * (1 + 5e-8)): not 1e-9
        assert moved > 0 and (q - p).norm() <= 1e-6 * moved, name


@pytest.mark.parametrize("kind,impls", [("rmsprop", ("for-loop", "foreach")), ("adam", ("for-loop", "foreach", "fused"))])
def test_optimizer_implementations_agree(kind, impls):
    results = []
    start = [p.detach().clone() for p in make("vaegan", seed=9)[0].parameters()]
    for impl in impls:
        model, x, _, z_prior = make("vaegan", seed=9)  # float64: no sign flips of near-zero gradients
        step = TrainStep(model, optimizers(model, impl, kind=kind), UpdateConfig(gamma=1e-3), None, StepMode())
        for i in range(3):
            step.gradients(x, z_prior, i)
            step.apply(ALL)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for p, q, p0 in zip(results[0], other, start):
            moved = (p - p0).norm()
            assert moved > 0 and (q - p).norm() <= 1e-9 * moved


def _group_entries(opt):
    return [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]


@pytest.mark.parametrize("kind", ["rmsprop", "adam"])
def test_a_loaded_optimizer_takes_the_current_implementations_flags(kind):
    # a state dict holds its run's foreach, fused and capturable: loaded into another --optimizer-impl they stay
    # the saved run's (torch's load_state_dict) until reset_implementation sets those of the optimizer built now
    def build(impl, tensor_lr):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
        groups = [{"params": params[:1], "weight_decay": 1e-2}, {"params": params[1:], "weight_decay": 0.0}]
        return make_optimizer(kind, impl, groups, 1e-3, tensor_lr)

    differed = 0
    for saved_impl, impl in itertools.permutations(["for-loop", "foreach", "fused"], 2):
        saved = build(saved_impl, False)
        for p in (p for g in saved.param_groups for p in g["params"]):
            p.grad = torch.ones_like(p)
        saved.step()
        for tensor_lr in (False, True):
            fresh, loaded = build(impl, tensor_lr), build(impl, tensor_lr)
            loaded.load_state_dict(copy.deepcopy(saved.state_dict()))
            if not isinstance(loaded, FusedMaskedRMSprop):  # whose own load_state_dict sets its flags
                assert _group_entries(loaded) == _group_entries(saved)
            differed += _group_entries(loaded) != _group_entries(fresh)
            reset_implementation({"net": loaded}, kind, impl, tensor_lr)
            assert _group_entries(loaded) == _group_entries(fresh), (saved_impl, impl, tensor_lr)
    assert differed  # the case is there to fail without the reset


def test_options_that_cannot_run_are_refused(monkeypatch):
    assert resolve_optimizer_impl("auto", "rmsprop", "cuda")[0] == "foreach"
    assert resolve_optimizer_impl("auto", "adam", "cuda")[0] == "fused"
    assert resolve_optimizer_impl("auto", "adam", "cpu")[0] == "foreach"
    fused_rmsprop = TrainConfig(optimizer_impl="fused", optimizer="rmsprop")  # our Triton kernel
    check(fused_rmsprop, Machine("cuda", 1, False))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check(fused_rmsprop, Machine("cpu", 1, False))  # under Triton's interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="--optimizer-impl fused with rmsprop runs our Triton kernel: Triton "
                                          "kernels need a CUDA device, and this run is on cpu"):
        check(fused_rmsprop, Machine("cpu", 1, False))
    with pytest.raises(ConfigError, match="--precision fp64 keeps float64 ones"):
        check(TrainConfig(optimizer_impl="fused", optimizer="rmsprop", precision="fp64"))
    with pytest.raises(ConfigError, match="a skipped step .* cannot restore"):
        check(TrainConfig(optimizer_impl="apex", optimizer="adam"))
    with pytest.raises(ConfigError, match="drop --no-compile"):
        check(TrainConfig(compile=False, cuda_graphs=True))
    check(TrainConfig(cuda_graphs=True))  # the step is compiled by default where graphs can run
    with pytest.raises(ConfigError, match="--cuda-graphs needs CUDA"):
        check(TrainConfig(compile=True, cuda_graphs=True), Machine("cpu", 1, False))
    with pytest.raises(ConfigError, match="would capture NCCL all-reduces in a CUDA graph"):
        check(TrainConfig(compile=True, cuda_graphs=True, sync_bn=True), Machine("cuda", 2, False))
    check(TrainConfig(compile=True, sync_bn=True), Machine("cuda", 2, False))  # compile alone is fine


def test_overlapped_reducer_fills_its_buckets_in_order_and_leaves_the_gradients(tmp_path):
    # One gloo rank (the all-reduce is the identity): the hooks, the buckets and their order.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, x, _, z_prior = make("vaegan", seed=13)
        cfg = UpdateConfig(gamma=1e-3)
        compute_gradients(model, x, z_prior, cfg, NOISE_SEED)
        want = grads(model)
        reducer = OverlappedGradientReducer(model, Context(0, 2), bucket_bytes=200_000)
        assert len(reducer.buckets) > 3
        compute_gradients(model, x, z_prior, cfg, NOISE_SEED)
        assert reducer.launched > 0 and all(reducer.works[:reducer.launched])  # started during the backward
        reducer.finish()
        got = grads(model)
        for name in want:  # world size 2 on one rank: the average halves the sum
            assert torch.allclose(got[name], want[name] / 2, rtol=1e-12), name
        assert reducer.launched == 0 and reducer.pending == [len(b) for b in reducer.buckets]
        reducer.remove()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_train_with_compile_logs_the_mode(tmp_path):
    done = run_train(SMALL + ["--steps", "3", "--compile", "--compile-backend", "aot_eager", "--log-every", "1",
                              "--out", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"step torch.compile \(aot_eager\), channels-last \(requested\), [1-9][0-9]* compiled graphs a step, "
                     r"optimizers foreach \(default \(the fused masked RMSprop kernel is chosen with --optimizer-impl "
                     r"fused: not yet measured on a GPU\)\)", done.stderr)
    done = run_train(SMALL + ["--steps", "1", "--cuda-graphs", "--compile", "--out", str(tmp_path / "x")])
    assert done.returncode == 2 and "--cuda-graphs needs CUDA" in done.stderr
    done = run_train(SMALL + ["--steps", "1", "--compile", "--kernels", "triton", "--out", str(tmp_path / "y")])
    assert done.returncode == 2 and "--compile with --kernels triton needs CUDA" in done.stderr
    done = run_train(SMALL + ["--steps", "1", "--cuda-graphs", "--no-compile", "--out", str(tmp_path / "z")])
    assert done.returncode == 2 and "--cuda-graphs" in done.stderr


def test_the_step_is_compiled_by_default_on_cuda_only():
    from vaegan.options import resolve_compile
    assert resolve_compile(TrainConfig(), "cuda", 1)[:2] == (True, True)
    assert resolve_compile(TrainConfig(), "cpu", 1)[:2] == (False, False)
    assert resolve_compile(TrainConfig(sync_bn=True), "cuda", 2)[:2] == (True, False)  # NCCL cannot be captured
    assert resolve_compile(TrainConfig(sync_bn=True), "cuda", 1)[:2] == (True, True)
    assert resolve_compile(TrainConfig(compile=False), "cuda", 1) == (False, False, "requested")
    assert resolve_compile(TrainConfig(compile=True), "cpu", 1)[:2] == (True, False)


def _steps(step, x, n):
    for i in range(n):
        step(x, None, i)
    return [p.detach().clone() for p in step.model.parameters()]


@pytest.mark.slow
def test_compiling_before_the_first_step_leaves_the_model_and_optimizers_as_they_were():
    # the trial step compiles, then everything is put back: the steps after it are the steps without it
    results = []
    for trial in (False, True):
        torch._dynamo.reset()
        model, x, _, _ = make("vaegan", seed=4, dtype=torch.float32)
        step = TrainStep(model, optimizers(model, tensor_lr=True), UpdateConfig(gamma=1e-3), None,
                         StepMode(compile=True, backend="aot_eager"))
        if trial:
            assert step.compile_now(x.shape[0], x.shape[1:]) is None
        results.append(_steps(step, x, 3))
    assert all(torch.equal(p, q) for p, q in zip(*results))


def test_a_step_that_fails_to_compile_runs_eager_from_where_it_was():
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C compiler on this machine\nsecond line")
    results = []
    for compiled in (True, False):
        torch._dynamo.reset()
        model, x, _, _ = make("vaegan", seed=4, dtype=torch.float32)
        step = TrainStep(model, optimizers(model, tensor_lr=compiled), UpdateConfig(gamma=1e-3), None,
                         StepMode(compile=compiled, backend=no_compiler))
        if compiled:
            reason = step.compile_now(x.shape[0], x.shape[1:])
            assert "no C compiler on this machine" in reason and "second line" not in reason
            assert not step.mode.compile and step.forward is compute_routed
        results.append(_steps(step, x, 3))
    assert all(torch.equal(p, q) for p, q in zip(*results))


class StepInGroupAdam(torch.optim.Adam):
    """A stand-in for apex's FusedAdam: it counts its steps in param_group['step'], a host integer."""

    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
        return super().step(closure)


def test_a_masked_step_refuses_an_optimizer_that_counts_steps_in_its_param_groups():
    from vaegan.optimizers import masked_step
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    optimizer = StepInGroupAdam([param], lr=0.1)
    optimizer.param_groups[0]["step"] = 0
    with pytest.raises(RuntimeError, match="StepInGroupAdam changed step in its param_groups"):
        masked_step(optimizer, torch.tensor(False))
    plain = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    plain.param_groups[0]["params"][0].grad = torch.ones(3)
    masked_step(plain, torch.tensor(False))  # torch's Adam keeps its step with its state: masked exactly
    assert torch.equal(plain.param_groups[0]["params"][0], torch.ones(3))


def test_the_trainer_runs_eager_when_compiling_by_default_fails(tmp_path, monkeypatch, capsys):
    # the CUDA default, decided without a GPU: compile by default, with a backend that cannot compile
    import json

    from vaegan import checkpoint, options, trainer

    @torch._dynamo.register_backend(name="vaegan_test_cannot_compile")
    def cannot_compile(graph, example_inputs):
        raise RuntimeError("no C compiler on this machine")
    monkeypatch.setattr(options, "resolve_compile",
                        lambda cfg, device_type, world_size: (cfg.compile is not False, False, "default"))
    tiny = dict(image_size=32, latent_size=16, fc_width=64, batch_size=8, workers=0, device="cpu", steps=4,
                log_every=2, sample_every=100, precision="fp32", compile_backend="vaegan_test_cannot_compile")
    torch._dynamo.reset()
    trainer.train(TrainConfig(out=str(tmp_path / "default"), **tiny))
    assert ("step eager, channels-last (default with CUDA, but compiling failed (RuntimeError: no C compiler on this "
            "machine") in capsys.readouterr().err
    assert json.load(open(tmp_path / "default" / "config.json"))["machine"]["compile"] is False
    trainer.train(TrainConfig(out=str(tmp_path / "eager"), compile=False, **tiny))
    fell_back, eager = (checkpoint.load(str(tmp_path / name)) for name in ("default", "eager"))
    assert all(torch.equal(fell_back["model"][n], eager["model"][n]) for n in eager["model"])
    # the rate is a float again, as in a run that never compiled (a tensor rate rounds differently on CUDA)
    assert isinstance(fell_back["optimizers"]["encoder"]["param_groups"][0]["lr"], float)


def test_a_resumed_run_steps_in_the_optimizer_implementation_it_resumes_with(tmp_path):
    # the checkpoint's param groups hold the saved run's foreach: the trainer sets the resumed run's
    from vaegan import checkpoint, trainer
    out = str(tmp_path / "run")
    trainer.train(TrainConfig(out=out, image_size=32, latent_size=16, fc_width=64, batch_size=8, workers=0,
                              device="cpu", steps=1, sample_every=100, precision="fp32", optimizer_impl="for-loop"))
    assert not checkpoint.load(out)["optimizers"]["encoder"]["param_groups"][0]["foreach"]
    resumed = TrainConfig(resume=out, steps=2, optimizer_impl="foreach")
    resumed.explicit = {"resume", "steps", "optimizer_impl"}
    trainer.train(resumed)
    saved = checkpoint.load(out)
    assert saved["step"] == 2
    assert all(g["foreach"] for opt in saved["optimizers"].values() for g in opt["param_groups"])


def test_the_step_levers_refuse_what_they_cannot_do():
    with pytest.raises(ConfigError, match="--decoder-call joint applies to .* not gan"):
        check(TrainConfig(decoder_call="joint", model="gan"))
    with pytest.raises(ConfigError, match="--decoder-call joint .* --sync-bn"):
        check(TrainConfig(decoder_call="joint", sync_bn=True))
    with pytest.raises(ConfigError, match="--max-autotune .* needs --compile"):
        check(TrainConfig(max_autotune=True, compile=False))
    with pytest.raises(ConfigError, match="--max-autotune .* needs --compile"):
        check(TrainConfig(max_autotune=True, compile=True, compile_backend="aot_eager"))
    check(TrainConfig(max_autotune=True, compile=True))  # inductor: allowed


def test_max_autotune_is_inductors_mode_with_or_without_cuda_graphs():
    assert StepMode(compile=True, cuda_graphs=True, max_autotune=True).compile_mode() == "max-autotune"
    assert StepMode(compile=True, max_autotune=True).compile_mode() == "max-autotune-no-cudagraphs"
    assert StepMode(compile=True, cuda_graphs=True).compile_mode() == "reduce-overhead"
    assert StepMode(compile=True).compile_mode() is None
    assert "max-autotune" in StepMode(compile=True, max_autotune=True).describe()
    from vaegan import options, trainer
    cfg, _ = options.resolve(TrainConfig(data="generated", image_size=32, latent_size=8, fc_width=16, batch_size=2,
                                         compile=True, max_autotune=True, out="unused"), torch.device("cpu"))
    _, _, step = trainer.build_step(cfg, torch.device("cpu"))  # compiles at its first call: not here
    assert step.mode.max_autotune and step.mode.compile_mode() == "max-autotune-no-cudagraphs"


@pytest.mark.slow
def test_train_with_the_step_levers_logs_them(tmp_path):
    done = run_train(SMALL + ["--steps", "2", "--log-every", "1", "--pad-channels", "--decoder-call", "joint",
                              "--out", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr
    assert "thin convolutions padded to multiples of 8 channels, the decoder's two passes in one call" in done.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["machine"]
    assert saved["pad_channels"] is True and saved["decoder_call"] == "joint"


@pytest.mark.slow
def test_train_with_fused_bn_relu_logs_the_fused_convolutions(tmp_path):
    # Triton's interpreter (conftest.py): narrow networks, one step; the joint decoder call keeps its own layers
    done = run_train(SMALL + ["--width", "0.125", "--steps", "1", "--log-every", "1", "--decoder-call", "joint",
                              "--fuse-bn-relu", "--out", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr
    assert ("the decoder's two passes in one call, BatchNorm and ReLU fused into the convolutions encoder.body.3, "
            "discriminator.features.5 (Triton)") in done.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["machine"]["fuse_bn_relu"] is True


def test_fuse_bn_relu_is_refused_where_it_cannot_run(monkeypatch):
    fused = TrainConfig(fuse_bn_relu=True)
    check(fused, Machine("cuda", 1, False))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check(fused, Machine("cpu", 1, False))  # under Triton's interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="--fuse-bn-relu runs our Triton convolution: Triton kernels need a CUDA "
                                          "device, and this run is on cpu"):
        check(fused, Machine("cpu", 1, False))
    with pytest.raises(ConfigError, match="not --precision fp64"):
        check(TrainConfig(fuse_bn_relu=True, precision="fp64"))
    with pytest.raises(ConfigError, match="--sync-bn takes them across processes"):
        check(TrainConfig(fuse_bn_relu=True, sync_bn=True))


MASKED_IMPLEMENTATIONS = [("rmsprop", "for-loop", False), ("rmsprop", "for-loop", True), ("rmsprop", "foreach", False),
                          ("rmsprop", "foreach", True), ("adam", "for-loop", False), ("adam", "for-loop", True),
                          ("adam", "foreach", False), ("adam", "fused", False), ("adam", "fused", True)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind,impl,tensor_lr", MASKED_IMPLEMENTATIONS, ids=lambda v: str(v))
def test_each_masked_step_is_one_graph_and_bit_identical_to_the_reference(kind, impl, tensor_lr, dtype):
    # the reference (copies, optimizer.step(), the copies put back) as it runs eager and as dynamo compiles it
    # (several graphs); masked_step eager and compiled whole with fullgraph=True: skips before the first step,
    # kept and skipped steps, then a resumed optimizer (its state loaded, as the trainer loads it) going on
    from vaegan.optimizers import create_state, masked_step, masked_step_reference, masked_update
    torch._dynamo.reset()

    def parameters():
        generator = torch.Generator().manual_seed(1)
        return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in ((6, 3, 5, 5), (7,))]

    def build(params):
        return make_optimizer(kind, impl, [{"params": params, "weight_decay": 3e-7}], 4e-4, tensor_lr)

    runs = {name: (params, build(params)) for name, params in
            (("reference", parameters()), ("masked", parameters()), ("compiled reference", parameters()),
             ("compiled", parameters()))}
    steps = {"reference": masked_step_reference, "masked": masked_step,
             "compiled reference": lambda opt, update: torch.compile(masked_step_reference, backend="aot_eager")(opt, update)}
    graph, compiled_graphs = {}, []

    def counting(graph_module, example_inputs):
        compiled_graphs.append(graph_module)
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    def compiled(opt, update):
        create_state(opt)
        if opt not in graph:  # a resumed optimizer is a new object: its own compiled step, as a resumed run's
            graph[opt] = torch.compile(functools.partial(masked_update, opt), backend=counting, fullgraph=True)
        graph[opt](update)
    steps["compiled"] = compiled
    for i, update in enumerate((False, True, False, True, True, False, True)):
        if i == 4:  # resume: a new optimizer loads the state dict, the implementation's flags reset as the trainer does
            for name, (params, opt) in runs.items():
                resumed = build(params)
                resumed.load_state_dict(opt.state_dict())
                reset_implementation({name: resumed}, kind, impl, tensor_lr)
                runs[name] = (params, resumed)
        generator = torch.Generator().manual_seed(10 + i)
        grads = [torch.randn(p.shape, generator=generator, dtype=dtype) for p in runs["reference"][0]]
        for name, (params, opt) in runs.items():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            steps[name](opt, torch.tensor(update))
        for eager, fast in (("reference", "masked"), ("compiled reference", "compiled")):
            (params_a, opt_a), (params_b, opt_b) = runs[eager], runs[fast]
            assert all(torch.equal(p, q) for p, q in zip(params_a, params_b)), (fast, i)
            for p, q in zip(params_a, params_b):
                assert opt_a.state[p].keys() == opt_b.state[q].keys()
                assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in opt_a.state[p]), (fast, i)
    start = parameters()
    assert not torch.equal(runs["masked"][0][0], start[0])  # it trained
    # compiled and eager differ only by torch's compiled optimizers' arithmetic (a float32 step count in Adam's
    # bias correction, 7e-6 of the movement here in float64) and by rounding in float32 parameters
    for p, q, p0 in zip(runs["masked"][0], runs["compiled"][0], start):
        assert (p - q).norm() <= (1e-3 if dtype == torch.float32 else 3e-5) * (p - p0).norm()
    # one graph for the optimizer and one for its resumed copy, whatever the updates were
    assert len(compiled_graphs) == 2


@pytest.mark.slow
def test_a_masked_step_that_cannot_compile_makes_the_run_eager_and_an_explicit_compile_stops(tmp_path, monkeypatch,
                                                                                                capsys):
    # the CUDA path on a CPU (decisions on the device: masked steps; compiled by default), with masked steps that
    # cannot compile whole: the trial finds it, the run says why, runs eager and trains what an eager run trains
    from ddp_worker import fail_to_compile_masked_steps
    from vaegan import checkpoint, optimizers, options, train_step, trainer
    monkeypatch.setattr(TrainStep, "read_cpu_decisions", False)
    monkeypatch.setattr(options, "resolve_compile",
                        lambda cfg, device_type, world_size: (cfg.compile is not False, False, "default"))
    monkeypatch.setattr(train_step, "masked_update", optimizers.masked_update)  # put back after the test
    fail_to_compile_masked_steps()
    tiny = dict(image_size=32, latent_size=16, fc_width=64, width=0.25, batch_size=4, workers=0, device="cpu",
                steps=3, log_every=1, sample_every=100, precision="fp32", compile_backend="aot_eager")
    torch._dynamo.reset()
    trainer.train(TrainConfig(out=str(tmp_path / "default"), **tiny))
    assert re.search(r"step eager, channels-last \(default with CUDA, but compiling failed \(Unsupported: [^\n]*\), so "
                     r"eager\)", capsys.readouterr().err)
    trainer.train(TrainConfig(out=str(tmp_path / "eager"), compile=False, **tiny))
    fell_back, eager = (checkpoint.load(str(tmp_path / name)) for name in ("default", "eager"))
    assert fell_back["step"] == 3 and len(open(tmp_path / "default" / "metrics.jsonl").readlines()) == 3
    assert all(torch.equal(fell_back["model"][n], eager["model"][n]) for n in eager["model"])
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"--compile was requested, but compiling the step failed \(Unsupported"):
        trainer.train(TrainConfig(out=str(tmp_path / "explicit"), compile=True, **tiny))
