"""The fused Triton kernels against their PyTorch references, forward and backward.

On a CPU they run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before any
kernel is imported); the interpreter has no bf16, so fp32 and fp16 are tested here.
"""
import os
import subprocess
import sys

import pytest
import torch

import kernels
from conftest import ROOT
from kernels import philox

# On a GPU the kernels run compiled, and bf16 is tested too; on a CPU, under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def on_device():
    torch.set_default_device(DEVICE)
    yield
    # None, not "cpu": "cpu" leaves a default-device mode installed, under which inductor's compiled
    # step in a later test drew other reparameterisation noise than the eager reference
    torch.set_default_device(None)


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# --- reparameterisation + KL -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37), (5, 128), (2, 200)])  # 37, 200: not powers of two
def test_reparam_kl_forward_and_backward_match_the_reference(dtype, shape):
    torch.manual_seed(sum(shape))
    mu, logvar = leaf(torch.randn(shape).to(dtype)), leaf((0.5 * torch.randn(shape)).to(dtype))
    z, kl = kernels.reparam_kl(mu, logvar, seed=99, row_offset=2)
    mu_ref, logvar_ref = leaf(mu), leaf(logvar)
    z_ref, kl_ref = kernels.reparam_kl_reference(mu_ref, logvar_ref, seed=99, row_offset=2)
    assert z.dtype == dtype and kl.dtype == torch.float32
    assert rel_err(z, z_ref) < TOL[dtype] and rel_err(kl, kl_ref) < TOL[dtype]
    grad_z, grad_kl = torch.randn(shape).to(dtype), torch.randn(shape[0])
    ((z.float() * grad_z.float()).sum() + (kl * grad_kl).sum()).backward()
    ((z_ref.float() * grad_z.float()).sum() + (kl_ref * grad_kl).sum()).backward()
    assert rel_err(mu.grad, mu_ref.grad) < 10 * TOL[dtype]
    assert rel_err(logvar.grad, logvar_ref.grad) < 10 * TOL[dtype]


def test_reparam_noise_is_standard_normal_and_uncorrelated():
    rows, columns = 64, 128
    zeros = torch.zeros(rows, columns)
    eps_a, _ = kernels.reparam_kl(zeros, zeros, seed=1)  # mu 0, logvar 0: z is eps
    eps_b, _ = kernels.reparam_kl(zeros, zeros, seed=2)
    for eps in (eps_a, eps_b):
        assert abs(eps.mean()) < 0.03 and abs(eps.var() - 1) < 0.05
        assert abs((eps > 0).float().mean() - 0.5) < 0.02
        kurtosis = (eps ** 4).mean() / eps.var() ** 2
        assert abs(kurtosis - 3) < 0.2  # normal, not uniform (1.8)
    flat_a, flat_b = eps_a.flatten(), eps_b.flatten()
    assert abs(torch.corrcoef(torch.stack([flat_a, flat_b]))[0, 1]) < 0.03  # across seeds
    assert abs(torch.corrcoef(torch.stack([flat_a[:-1], flat_a[1:]]))[0, 1]) < 0.03  # neighbours
    assert abs(torch.corrcoef(torch.stack([eps_a[:-1].flatten(), eps_a[1:].flatten()]))[0, 1]) < 0.03  # rows
    # and it is Philox at (seed, offset), as the PyTorch stream computes it
    assert (eps_a - philox.rows_randn(1, rows, columns, device=DEVICE)).abs().max() < 1e-5


def test_backward_redraws_the_forwards_noise():
    mu, logvar = leaf(torch.zeros(4, 50)), leaf(torch.zeros(4, 50))
    z, kl = kernels.reparam_kl(mu, logvar, seed=7)
    z.sum().backward()  # d z / d logvar = eps * exp(logvar/2) / 2 = eps / 2 at logvar 0
    assert torch.allclose(logvar.grad, 0.5 * z.detach(), atol=1e-6)
    assert torch.allclose(mu.grad, torch.ones_like(mu))


def test_rows_of_a_rank_are_its_slice_of_the_global_batch():
    mu, logvar = torch.randn(8, 33), torch.randn(8, 33)
    z_global, kl_global = kernels.reparam_kl(mu, logvar, seed=5)
    z_rank1, kl_rank1 = kernels.reparam_kl(mu[4:], logvar[4:], seed=5, row_offset=4)
    assert torch.equal(z_rank1, z_global[4:]) and torch.equal(kl_rank1, kl_global[4:])


def test_a_seed_tensor_draws_what_the_int_seed_draws():
    # The fast step passes the seed as a device tensor (no recompile, no new CUDA graph per step).
    mu = torch.randn(5, 9, device=DEVICE, requires_grad=True)
    logvar = torch.randn(5, 9, device=DEVICE, requires_grad=True)
    for seed in (3, 2 ** 31 + 3, -5):
        z_int, kl_int = kernels.reparam_kl(mu, logvar, seed=seed, row_offset=2)
        z_tensor, kl_tensor = kernels.reparam_kl(mu, logvar, seed=torch.tensor(seed), row_offset=2)
        assert torch.equal(z_int, z_tensor) and torch.equal(kl_int, kl_tensor)
        eps_int = philox.rows_randn(seed, 5, 9, 2, device=DEVICE)
        assert torch.equal(eps_int, philox.rows_randn(torch.tensor(seed, device=DEVICE), 5, 9, 2, device=DEVICE))
        g_int = torch.autograd.grad(z_int.sum(), mu)[0]
        g_tensor = torch.autograd.grad(kernels.reparam_kl(mu, logvar, seed=torch.tensor([seed]), row_offset=2)[0].sum(),
                                       mu)[0]
        assert torch.equal(g_int, g_tensor)
    assert not torch.equal(kernels.reparam_kl(mu, logvar, seed=torch.tensor(4))[0], z_int)


def test_reparam_kl_takes_non_contiguous_inputs():
    mu, logvar = torch.randn(40, 6).t(), torch.randn(40, 6).t()  # (6, 40), transposed storage
    assert not mu.is_contiguous()
    z, kl = kernels.reparam_kl(mu, logvar, seed=3)
    z_ref, kl_ref = kernels.reparam_kl_reference(mu.contiguous(), logvar.contiguous(), seed=3)
    assert rel_err(z, z_ref) < 1e-5 and rel_err(kl, kl_ref) < 1e-5


# --- feature likelihood ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 5000), (4, 16, 8, 8)])  # 315, 5000: not block multiples
def test_feature_nll_forward_and_backward_match_the_reference(dtype, shape):
    torch.manual_seed(shape[1])
    fake, real = leaf(torch.randn(shape).to(dtype)), leaf(torch.randn(shape).to(dtype))
    got = kernels.feature_nll(fake, real)
    fake_ref = leaf(fake)
    want = kernels.feature_nll_reference(fake_ref, real)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    assert rel_err(got, want) < 1e-5  # fp16/bf16 inputs are accumulated in fp32
    grad = torch.randn(shape[0])
    (got * grad).sum().backward()
    (want * grad).sum().backward()
    assert fake.grad.dtype == dtype
    assert rel_err(fake.grad, fake_ref.grad) < TOL[dtype]
    assert real.grad is None  # the real features are a target


def test_feature_nll_takes_non_contiguous_inputs():
    fake, real = torch.randn(4, 8, 8, 16).permute(0, 3, 1, 2), torch.randn(4, 8, 8, 16).permute(0, 3, 1, 2)
    assert not fake.is_contiguous()
    assert rel_err(kernels.feature_nll(fake, real), kernels.feature_nll_reference(fake, real)) < 1e-5


# --- GAN log-losses ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_real,n_fake", [(6, 6), (5, 10), (1500, 700)])
def test_gan_loss_forward_and_backward_match_the_reference(dtype, n_real, n_fake):
    torch.manual_seed(n_real + n_fake)
    real, fake = leaf((3 * torch.randn(n_real)).to(dtype)), leaf((3 * torch.randn(n_fake)).to(dtype))
    got = kernels.gan_loss(real, fake, 0.4, 0.7)
    real_ref, fake_ref = leaf(real), leaf(fake)
    want = kernels.gan_loss_reference(real_ref, fake_ref, 0.4, 0.7)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and abs(g - w) <= 1e-5 * abs(w) + 1e-6
    (1.3 * got[0] + 0.6 * got[1]).backward()
    (1.3 * want[0] + 0.6 * want[1]).backward()
    assert rel_err(real.grad, real_ref.grad) < TOL[dtype]
    assert rel_err(fake.grad, fake_ref.grad) < TOL[dtype]


def test_gan_loss_is_stable_for_extreme_logits():
    dis_loss, gen_loss, real_cost, fake_cost = kernels.gan_loss(torch.tensor([200.0, -200.0]),
                                                               torch.tensor([-200.0, 300.0]))
    assert dis_loss.item() == pytest.approx(0.5 * 100 + 0.5 * 150)
    assert gen_loss.item() == pytest.approx(0.5 * 100)
    assert torch.isfinite(real_cost) and torch.isfinite(fake_cost)


# --- every op: NaN in, NaN out; an empty batch is an error ---------------------------------------

def test_nan_in_gives_nan_out():
    nan_row = torch.tensor([[float("nan"), 1.0], [0.5, 0.5]])
    z, kl = kernels.reparam_kl(nan_row, torch.zeros(2, 2), seed=0)
    assert torch.isnan(z[0, 0]) and torch.isnan(kl[0]) and not torch.isnan(kl[1])
    nll = kernels.feature_nll(nan_row, torch.zeros(2, 2))
    assert torch.isnan(nll[0]) and not torch.isnan(nll[1])
    losses = kernels.gan_loss(torch.tensor([float("nan"), 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.isnan(losses[0]) and torch.isnan(losses[2])


def test_empty_batch_is_a_clear_error():
    empty = torch.zeros(0, 4)
    with pytest.raises(ValueError, match="reparam_kl: mu has an empty batch"):
        kernels.reparam_kl(empty, empty, seed=0)
    with pytest.raises(ValueError, match="feature_nll: features_fake has an empty batch"):
        kernels.feature_nll(empty, empty)
    with pytest.raises(ValueError, match="gan_loss: logits_fake has an empty batch"):
        kernels.gan_loss(torch.zeros(3), torch.zeros(0))
    with pytest.raises(ValueError, match="does not match"):
        kernels.feature_nll(torch.zeros(2, 3), torch.zeros(2, 4))


# --- torch.compile traces through the ops ------------------------------------------------------

TRACE = r"""
import re
import torch
import kernels
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

graphs = []
def forward_compiler(gm, example_inputs):
    graphs.append(gm.code)
    def run(*args):
        raise SystemExit(0)  # traced; there is no GPU to run the kernels on
    return run

def losses(mu, logvar, fake, real, logits_real, logits_fake):
    z, kl = kernels.reparam_kl(mu, logvar, 7)
    dis_loss = kernels.gan_loss(logits_real, logits_fake)[0]
    return z.sum() + kl.sum() + kernels.feature_nll(fake, real).sum() + dis_loss

args = [torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True),
        torch.randn(4, 30, requires_grad=True), torch.randn(4, 30), torch.randn(4, requires_grad=True),
        torch.randn(4, requires_grad=True)]
compiled = torch.compile(losses, fullgraph=True, backend=aot_autograd(fw_compiler=forward_compiler))
try:
    compiled(*args)
finally:
    indices = {int(i) for code in graphs for i in re.findall(r"kernel_idx = (\d+)", code)}
    names = {kernel_side_table.get_kernel(i).fn.__name__ for i in indices}
    for kernel in ("_reparam_kl_forward", "_feature_nll_forward", "_gan_loss_forward"):
        print(kernel, kernel in names)
"""


@pytest.mark.slow
def test_torch_compile_fullgraph_traces_into_the_kernels():
    # Without the interpreter (which wraps kernels in a way the tracer cannot see through), and on
    # a CPU: the graph is traced whole, with no break, and holds the Triton kernels themselves.
    # Running the compiled graph needs a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", TRACE], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for kernel in ("_reparam_kl_forward", "_feature_nll_forward", "_gan_loss_forward"):
        assert f"{kernel} True" in done.stdout, done.stdout


# --- the self-check a run makes before relying on the kernels -----------------------------------

def _grad_scaled(t, factor):
    """t in the forward pass; its gradient times `factor` in the backward pass."""
    return t * factor - (t * (factor - 1)).detach()


def test_self_check_passes_and_names_a_kernel_that_disagrees_or_fails(monkeypatch):
    from dataclasses import replace

    from kernels import selfcheck
    assert selfcheck.self_check(torch.device(DEVICE)) is None
    original = list(selfcheck.OPS)
    reparam, likelihood, gan = original

    def forward_off(real, fake, rw, fw):  # the generator's term 1% off
        dis_loss, gen_loss, real_cost, fake_cost = kernels.gan_loss(real, fake, rw, fw)
        return dis_loss, 1.01 * gen_loss, real_cost, fake_cost

    def backward_off(mu, logvar, seed, row_offset):  # right values, a 1% wrong gradient for logvar
        return kernels.reparam_kl(mu, _grad_scaled(logvar, 1.01), seed, row_offset)

    def fails(fake, real):
        raise RuntimeError("PTX was compiled with an unsupported toolchain\nmore detail")

    cases = [(gan, forward_off, "the fused gan_loss disagrees with its reference"),
             (reparam, backward_off, "the fused reparam_kl disagrees with its reference"),
             (likelihood, fails, "the fused feature_nll failed to run on")]
    for op, fused, message in cases:
        monkeypatch.setattr(selfcheck, "OPS", [replace(o, fused=fused) if o is op else o for o in original])
        reason = selfcheck.self_check(torch.device(DEVICE))
        assert reason is not None and message in reason, reason
    assert "unsupported toolchain" in reason and "more detail" not in reason  # one line


def test_a_failed_self_check_falls_back_under_auto_and_stops_an_explicit_request(monkeypatch):
    from kernels import selfcheck
    from vaegan.config import ConfigError
    from vaegan.options import resolve_kernels
    monkeypatch.setattr(kernels, "triton_unavailable_reason", lambda device_type: None)
    cuda = torch.device("cuda", 0)  # decided without touching a GPU: the check is injected
    monkeypatch.setattr(selfcheck, "self_check", lambda device: None)
    assert resolve_kernels("auto", cuda) == ("triton", "default on CUDA, checked against the references")
    monkeypatch.setattr(selfcheck, "self_check", lambda device: "the fused gan_loss disagrees with its reference")
    assert resolve_kernels("auto", cuda) == ("torch", "default, as the fused gan_loss disagrees with its reference")
    with pytest.raises(ConfigError, match="--kernels triton: the fused gan_loss disagrees"):
        resolve_kernels("triton", cuda)
    assert resolve_kernels("torch", cuda) == ("torch", "requested")
    assert resolve_kernels("auto", torch.device("cpu"))[0] == "torch"
