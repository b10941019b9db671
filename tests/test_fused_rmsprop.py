"""The fused masked RMSprop (kernels/rmsprop.py, vaegan/optimizers.FusedMaskedRMSprop): torch's RMSprop
where the flag is True, nothing read or written where it is False, compiled as eager, and state dicts
interchangeable with torch's RMSprop. On a CPU the kernel runs under Triton's interpreter (conftest.py)."""
import copy
import functools
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from kernels.reference import masked_rmsprop_reference_
from kernels.rmsprop import masked_rmsprop_
from test_train_step import ALL, optimizers
from vaegan.gradients import UpdateConfig
from vaegan.models import VAEGAN
from vaegan.optimizers import FusedMaskedRMSprop, masked_step, reset_learning_rate
from vaegan.train_step import StepMode, TrainStep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATTERN = [False, False, True, False, True, True, False, True]  # skips before the first step too
DECAYED = [(37,), (5, 5, 3, 7), (4, 3, 5, 5)]  # the last one channels-last; none a multiple of the block
PLAIN = [(1,), (1000,), (70001,)]  # the last: more than one block under the interpreter


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def parameters(generator):
    params = [torch.randn(shape, generator=generator).to(DEVICE) for shape in DECAYED + PLAIN]
    params[2] = params[2].contiguous(memory_format=torch.channels_last)
    return [torch.nn.Parameter(p) for p in params]


def groups(params, lr):
    n = len(DECAYED)
    return [{"params": params[:n], "weight_decay": 1e-2}, {"params": params[n:], "weight_decay": 0.0}], lr


def random_grad(param, generator):
    """A random gradient in the parameter's layout (as autograd leaves it)."""
    return torch.empty_like(param, requires_grad=False).copy_(torch.randn(param.shape, generator=generator))


def state(opt):
    return {(i, k): v for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            for k, v in opt.state[p].items() if torch.is_tensor(v)}


def fresh_generator():
    generator = torch.Generator()
    seed = generator.seed()  # fresh inputs each run, named in the failures
    return generator, seed


def test_the_kernel_is_torchs_rmsprop_where_kept_and_touches_nothing_where_skipped():
    generator, seed = fresh_generator()
    fused_params = parameters(generator)
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    reference_params = [p.detach().clone() for p in fused_params]
    lr = torch.tensor(1e-2, device=DEVICE)
    fused = FusedMaskedRMSprop(*groups(fused_params, lr))
    host_rule = torch.optim.RMSprop(*groups(torch_params, 1e-2), alpha=0.9, eps=1e-8, foreach=False)
    reference_state = [torch.zeros_like(p) for p in reference_params]
    decays = [1e-2] * len(DECAYED) + [0.0] * len(PLAIN)
    for i, update in enumerate(PATTERN):
        before = [p.detach().clone() for p in fused_params], {k: v.clone() for k, v in state(fused).items()}
        for p, q in zip(fused_params, torch_params):
            p.grad = random_grad(p, generator)
            q.grad = p.grad.clone()
        flag = torch.tensor(update, device=DEVICE)
        masked_step(fused, flag)
        if update:
            host_rule.step()
        for r, sq, p, decay in zip(reference_params, reference_state, fused_params, decays):
            masked_rmsprop_reference_(r, p.grad, sq, flag, lr, decay)
        got = state(fused)
        if not update:  # bit-identical: nothing moved
            assert all(torch.equal(p, q) for p, q in zip(fused_params, before[0])), (seed, i)
            assert all(torch.equal(got[k], v) for k, v in before[1].items()), (seed, i)
        for j, (p, q, r) in enumerate(zip(fused_params, torch_params, reference_params)):
            assert rel_err(p, q) <= 1e-6 and rel_err(p, r) <= 1e-6, (seed, i, j)
            assert p.stride() == q.stride()  # the channels-last weight stays channels-last
        want = state(host_rule)
        assert set(got) == set(want) or not any(PATTERN[:i + 1]), (seed, i)
        for key, value in want.items():
            if key[1] == "step":
                assert torch.equal(got[key].cpu(), value.cpu()), (seed, i, key)
            else:
                assert rel_err(got[key], value) <= 1e-6, (seed, i, key)
        for j, square_avg in enumerate(reference_state):
            assert rel_err(got[(j, "square_avg")], square_avg) <= 1e-6, (seed, i, j)


def test_a_skipped_step_ignores_a_nan_gradient_that_a_kept_one_takes():
    # the flag is read first: a gradient full of NaN (the non-finite guard's case) changes nothing
    param, square_avg = torch.randn(1000, device=DEVICE), torch.rand(1000, device=DEVICE)
    grad = torch.full_like(param, float("nan"))
    saved = param.clone(), square_avg.clone()
    for decay in (0.0, 0.1):
        masked_rmsprop_(param, grad, square_avg, torch.tensor(False, device=DEVICE), 1e-3, decay)
        assert torch.equal(param, saved[0]) and torch.equal(square_avg, saved[1])
    masked_rmsprop_(param, grad, square_avg, torch.tensor(True, device=DEVICE), 1e-3)
    assert param.isnan().all() and square_avg.isnan().all()  # ... and a kept one does read it


def test_an_update_the_kernel_refuses_leaves_the_step_counts_as_they_were():
    generator, _ = fresh_generator()
    params = parameters(generator)
    opt = FusedMaskedRMSprop(*groups(params, 1e-2))
    for p in params:
        p.grad = random_grad(p, generator)
    masked_step(opt, torch.tensor(True, device=DEVICE))
    before = {k: v.clone() for k, v in state(opt).items()}
    for bad in (torch.tensor(1.0, device=DEVICE), torch.ones(2, dtype=torch.bool, device=DEVICE)):
        with pytest.raises((TypeError, ValueError), match="update must be"):
            masked_step(opt, bad)
        assert all(torch.equal(v, state(opt)[k]) for k, v in before.items())


def test_tensors_that_do_not_share_one_dense_layout_are_refused():
    param = torch.zeros(4, 3, 5, 5, device=DEVICE)
    flag = torch.tensor(True, device=DEVICE)
    with pytest.raises(ValueError, match="grad .* is not dense in param's layout"):
        masked_rmsprop_(param, param.contiguous(memory_format=torch.channels_last), torch.zeros_like(param), flag, 1.0)
    with pytest.raises(ValueError, match="square_avg .* is not dense"):
        masked_rmsprop_(param, torch.zeros_like(param), torch.zeros(4, 3, 5, 10, device=DEVICE)[..., ::2], flag, 1.0)
    with pytest.raises(TypeError, match="param must be float32"):
        masked_rmsprop_(param.double(), param.double(), param.double(), flag, 1.0)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_compiled_masked_step_is_the_eager_one_and_a_new_rate_recompiles_nothing(backend):
    generator, seed = fresh_generator()
    eager_params = parameters(generator)
    fast_params = [torch.nn.Parameter(p.detach().clone()) for p in eager_params]
    eager = FusedMaskedRMSprop(*groups(eager_params, torch.tensor(1e-2, device=DEVICE)))
    fast = FusedMaskedRMSprop(*groups(fast_params, torch.tensor(1e-2, device=DEVICE)))
    compiled = torch.compile(functools.partial(masked_step, fast), backend=backend, fullgraph=True)  # no graph break
    if backend == "inductor":  # one compilation, not two (its code generation is slow on a CPU): the state exists
        for opt in (eager, fast):
            masked_step(opt, torch.tensor(False, device=DEVICE))
    graphs = None
    for i, update in enumerate(PATTERN):
        for opt in (eager, fast):
            for group in opt.param_groups:
                group["lr"].fill_(1e-2 / (1 + i))
        for p, q in zip(eager_params, fast_params):
            p.grad = random_grad(p, generator)
            q.grad = p.grad.clone()
        masked_step(eager, torch.tensor(update, device=DEVICE))
        compiled(torch.tensor(update, device=DEVICE))
        assert all(torch.equal(p, q) for p, q in zip(eager_params, fast_params)), (seed, i)
        assert state(eager).keys() == state(fast).keys()
        assert all(torch.equal(v, state(fast)[k]) for k, v in state(eager).items()), (seed, i)
        if i == 1:  # compiled once without state (aot_eager), once with it
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # new rates, new flags: no recompile


GPU_TRACE = r"""
import functools
import torch
import torch._inductor.compile_fx as compile_fx
import triton
from triton.backends.compiler import GPUTarget
from vaegan.optimizers import FusedMaskedRMSprop, masked_step


class Hopper:  # all that inductor's analysis of the kernel's stores asks of a driver (there is no GPU here)
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(Hopper())
post_grad = compile_fx._recursive_post_grad_passes


def traced(gm, is_inference=False):
    post_grad(gm, is_inference)
    print(gm.code)
    raise SystemExit(0)  # the graph inductor generates code from; there is no GPU to generate it for


compile_fx._recursive_post_grad_passes = traced
params = [torch.nn.Parameter(torch.randn(37)), torch.nn.Parameter(torch.randn(4, 3, 5, 5))]
opt = FusedMaskedRMSprop([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:]}], lr=torch.tensor(1e-3))
for p in params:
    p.grad = torch.randn_like(p)
torch.compile(functools.partial(masked_step, opt), fullgraph=True)(torch.tensor(False))
"""


def test_inductor_runs_the_kernel_in_place_on_a_gpu():
    # Without the interpreter the op is a triton_op: inductor's graph calls the kernel itself on the
    # parameters and their state, in place (no clones that would move a skipped network's memory)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", GPU_TRACE], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    graph = done.stdout
    assert graph.count("triton_kernel_wrapper_mutation(") == 2, graph
    written = re.findall(r"'(param_ptr|square_avg_ptr)': (\w+)", graph)
    assert len(written) == 4 and all(re.fullmatch(r"arg\d+_1", name) for _, name in written), graph  # the inputs
    assert "clone" not in graph and "triton_kernel_wrapper_functional" not in graph, graph
    assert graph.count("aten.copy_.default") == 2, graph  # the two 0-d step counts


def small_vaegan_steps(impl, dtype, steps=3):
    """The parameters at the start and after each of `steps` eager steps of a quarter-width 32 px VAE/GAN
    in `dtype` (as float64 copies)."""
    torch.manual_seed(9)
    model = VAEGAN("vaegan", 32, 3, latent_size=12, fc_width=40, width=0.25)
    x, z_prior = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 12)
    model, x, z_prior = model.to(DEVICE, dtype), x.to(DEVICE, dtype), z_prior.to(DEVICE, dtype)
    step = TrainStep(model, optimizers(model, impl), UpdateConfig(gamma=1e-3), None, StepMode())
    after = [[p.detach().to(torch.float64, copy=True) for p in model.parameters()]]
    for i in range(steps):
        step.gradients(x, z_prior, i)
        step.apply(ALL)
        after.append([p.detach().to(torch.float64, copy=True) for p in model.parameters()])
    return after


def distance(a, b):
    return sum((p - q).pow(2).sum() for p, q in zip(a, b)).sqrt()


def test_the_step_with_the_fused_rmsprop_follows_foreach():
    # float32, the kernel's. After one step (the same gradients) the fused and foreach RMSprop agree to
    # rounding. After three, RMSprop's nearly sign(gradient) * lr first steps have turned rounding into a
    # few flipped near-zero gradients: the fused run stays within float32's own spread, no farther from
    # torch's float32 run than the float64 run is (measured: 0.05 and 0.08 of the parameters' movement)
    exact, torch_steps, fused_steps = (small_vaegan_steps(impl, dtype) for impl, dtype in
                                       (("foreach", torch.float64), ("foreach", torch.float32),
                                        ("fused", torch.float32)))
    moved = [distance(exact[i], exact[0]) for i in range(4)]
    assert distance(fused_steps[1], torch_steps[1]) <= 1e-6 * moved[1]
    spread = distance(exact[3], torch_steps[3])
    assert 0 < spread < 0.2 * moved[3] and distance(fused_steps[3], torch_steps[3]) <= spread


def test_state_dicts_go_into_torchs_rmsprop_and_back():
    # as a checkpoint holds them (copies); then torch's RMSprop and ours step on from there alike
    generator, seed = fresh_generator()
    params = parameters(generator)
    fused = FusedMaskedRMSprop(*groups(params, torch.tensor(1e-2, device=DEVICE)))
    for update in PATTERN:
        for p in params:
            p.grad = random_grad(p, generator)
        masked_step(fused, torch.tensor(update, device=DEVICE))
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.RMSprop(*groups(copies, 1e-2), alpha=0.9, eps=1e-8)
    plain.load_state_dict(copy.deepcopy(fused.state_dict()))
    again = FusedMaskedRMSprop(*groups(params, 1.0))
    again.load_state_dict(copy.deepcopy(plain.state_dict()))
    for opt in (plain, again):
        assert state(opt).keys() == state(fused).keys()
        assert all(torch.equal(v, state(opt)[k]) and v.device == state(opt)[k].device for k, v in state(fused).items())
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
            [{k: v for k, v in g.items() if k != "params"} for g in fused.param_groups]
    for opt in (plain, again):  # the trainer resets the rate after loading
        reset_learning_rate({"n": opt}, 1e-3, tensor_lr=True)
    for p, q in zip(params, copies):
        p.grad = random_grad(p, generator)
        q.grad = p.grad.clone()
    plain.step()
    again.step()
    for j, (p, q) in enumerate(zip(params, copies)):
        assert rel_err(p, q) <= 1e-6, (seed, j)
    assert all(rel_err(v, state(plain)[k]) <= 1e-6 for k, v in state(again).items()), seed


def test_the_self_check_passes_and_stops_a_run_whose_kernel_disagrees(monkeypatch):
    from kernels import rmsprop, selfcheck
    from vaegan import options
    from vaegan.config import ConfigError, TrainConfig
    assert selfcheck.rmsprop_self_check(torch.device(DEVICE)) is None
    cfg = TrainConfig(data="generated", optimizer_impl="fused", out="unused", device=DEVICE, precision="fp32")
    resolved, why = options.resolve(cfg, torch.device(DEVICE))
    assert resolved.optimizer_impl == "fused" and why["optimizer_impl"] == "requested, checked against the reference"
    original = rmsprop.masked_rmsprop_

    def off(param, grad, square_avg, update, lr, weight_decay=0.0, *args):  # the decay 10% off
        return original(param, grad, square_avg, update, lr, 1.1 * weight_decay, *args)

    def writes_when_skipped(param, grad, square_avg, update, lr, *args):
        original(param, grad, square_avg, torch.ones_like(update), lr, *args)

    for broken, message in ((off, "the fused RMSprop disagrees with its reference"),
                            (writes_when_skipped, "the fused RMSprop changed a skipped step's values")):
        monkeypatch.setattr(rmsprop, "masked_rmsprop_", broken)
        with pytest.raises(ConfigError, match=f"--optimizer-impl fused: {message}"):
            options.resolve(cfg, torch.device(DEVICE))


@pytest.mark.parametrize("wrong", ["decay 10% off", "alpha 0.901", "no eps"])
def test_the_self_check_sees_every_term_of_the_update(monkeypatch, wrong):
    # its problem makes each term visible above the tolerance, with fixed inputs: a wrong kernel fails every time
    from kernels import rmsprop, selfcheck
    original = rmsprop.masked_rmsprop_

    def broken(param, grad, square_avg, update, lr, weight_decay=0.0, alpha=0.9, eps=1e-8):
        if wrong == "decay 10% off":
            weight_decay *= 1.1
        elif wrong == "alpha 0.901":
            alpha = 0.901
        else:
            eps = 0.0
        original(param, grad, square_avg, update, lr, weight_decay, alpha, eps)

    monkeypatch.setattr(rmsprop, "masked_rmsprop_", broken)
    why = selfcheck.rmsprop_self_check(torch.device(DEVICE))
    assert why is not None and why.startswith("the fused RMSprop disagrees with its reference"), why
