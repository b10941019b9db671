"""Fused GAN log-losses from logits, with the equilibrium statistics from the same pass.

gan_loss(logits_real, logits_fake, real_weight, fake_weight) returns four 0-d float32 tensors:
  dis_loss  = real_weight * mean(-log Dis(x)) + fake_weight * mean(-log(1 - Dis(fake)))
  gen_loss  = fake_weight * mean(-log Dis(fake))      (the non-saturating decoder term)
  real_cost = mean(-log(Dis(x) + 1e-3)), fake_cost = mean(-log(1 - Dis(fake) + 1e-3))
(the last two are the authors' equilibrium statistics: no gradient). They stay on the device:
the step reads them once, in its one synchronisation. The minimax decoder term is -dis_loss.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vaegan import losses

from .checks import check_batch

BLOCK = 1024
LOG_EPS = 1e-3


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) without overflow
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _gan_loss_forward(real_ptr, fake_ptr, out_ptr, n_real, n_fake, real_weight, fake_weight,
                      BLOCK: tl.constexpr, LOG_EPS: tl.constexpr):
    real_loss = tl.zeros([BLOCK], dtype=tl.float32)
    real_cost = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_real, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < n_real
        x = tl.load(real_ptr + i, mask=mask, other=0.0).to(tl.float32)
        real_loss += tl.where(mask, _softplus(-x), 0.0)
        real_cost += tl.where(mask, -tl.log(tl.sigmoid(x) + LOG_EPS), 0.0)
    fake_loss = tl.zeros([BLOCK], dtype=tl.float32)
    gen_loss = tl.zeros([BLOCK], dtype=tl.float32)
    fake_cost = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_fake, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < n_fake
        x = tl.load(fake_ptr + i, mask=mask, other=0.0).to(tl.float32)
        fake_loss += tl.where(mask, _softplus(x), 0.0)
        gen_loss += tl.where(mask, _softplus(-x), 0.0)
        fake_cost += tl.where(mask, -tl.log(tl.sigmoid(-x) + LOG_EPS), 0.0)
    tl.store(out_ptr + 0, real_weight * tl.sum(real_loss, axis=0) / n_real
             + fake_weight * tl.sum(fake_loss, axis=0) / n_fake)
    tl.store(out_ptr + 1, fake_weight * tl.sum(gen_loss, axis=0) / n_fake)
    tl.store(out_ptr + 2, tl.sum(real_cost, axis=0) / n_real)
    tl.store(out_ptr + 3, tl.sum(fake_cost, axis=0) / n_fake)


@triton.jit
def _gan_loss_backward(real_ptr, fake_ptr, grad_ptr, grad_real_ptr, grad_fake_ptr, n_real, n_fake, real_weight,
                       fake_weight, BLOCK: tl.constexpr):
    grad_dis = tl.load(grad_ptr + 0)
    grad_gen = tl.load(grad_ptr + 1)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_real
    x = tl.load(real_ptr + i, mask=mask, other=0.0).to(tl.float32)
    grad = grad_dis * real_weight / n_real * (tl.sigmoid(x) - 1.0)
    tl.store(grad_real_ptr + i, grad.to(grad_real_ptr.dtype.element_ty), mask=mask)
    mask = i < n_fake
    x = tl.load(fake_ptr + i, mask=mask, other=0.0).to(tl.float32)
    p = tl.sigmoid(x)
    grad = fake_weight / n_fake * (grad_dis * p + grad_gen * (p - 1.0))
    tl.store(grad_fake_ptr + i, grad.to(grad_fake_ptr.dtype.element_ty), mask=mask)


@triton_op("vaegan::gan_loss_forward", mutates_args={})
def _forward(logits_real: torch.Tensor, logits_fake: torch.Tensor, real_weight: float,
             fake_weight: float) -> torch.Tensor:
    out = torch.empty(4, device=logits_real.device, dtype=torch.float32)
    wrap_triton(_gan_loss_forward)[(1,)](logits_real, logits_fake, out, logits_real.numel(), logits_fake.numel(),
                                         real_weight, fake_weight, BLOCK=BLOCK, LOG_EPS=LOG_EPS)
    return out


@triton_op("vaegan::gan_loss_backward", mutates_args={})
def _backward(logits_real: torch.Tensor, logits_fake: torch.Tensor, grad: torch.Tensor, real_weight: float,
              fake_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    grad_real = torch.empty_like(logits_real)
    grad_fake = torch.empty_like(logits_fake)
    n_real, n_fake = logits_real.numel(), logits_fake.numel()
    grid = (triton.cdiv(max(n_real, n_fake), BLOCK),)
    wrap_triton(_gan_loss_backward)[grid](logits_real, logits_fake, grad, grad_real, grad_fake, n_real, n_fake,
                                          real_weight, fake_weight, BLOCK=BLOCK)
    return grad_real, grad_fake


def _setup_context(ctx, inputs, output):
    logits_real, logits_fake, real_weight, fake_weight = inputs
    ctx.save_for_backward(logits_real, logits_fake)
    ctx.weights = (real_weight, fake_weight)


def _autograd_backward(ctx, grad):
    logits_real, logits_fake = ctx.saved_tensors
    grad_real, grad_fake = _backward(logits_real, logits_fake, grad.contiguous(), *ctx.weights)
    return grad_real, grad_fake, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def gan_loss(logits_real, logits_fake, real_weight=0.5, fake_weight=0.5):
    """(dis_loss, gen_loss, real_cost, fake_cost), each a 0-d float32 tensor; logits are (N,)."""
    check_batch("gan_loss", logits_real=logits_real)
    check_batch("gan_loss", logits_fake=logits_fake)
    if logits_real.device != logits_fake.device:
        raise ValueError("gan_loss: logits_real and logits_fake are on different devices")
    out = _forward(logits_real.contiguous().reshape(-1), logits_fake.contiguous().reshape(-1),
                   float(real_weight), float(fake_weight))
    return out[0], out[1], out[2].detach(), out[3].detach()


def gan_loss_reference(logits_real, logits_fake, real_weight=0.5, fake_weight=0.5):
    real, fake = logits_real.float().reshape(-1), logits_fake.float().reshape(-1)
    dis_loss = real_weight * losses.real_log_loss(real).mean() + fake_weight * losses.fake_log_loss(fake).mean()
    gen_loss = fake_weight * losses.real_log_loss(fake).mean()
    real_cost, fake_cost = losses.equilibrium_costs(real.detach(), fake.detach())
    return dis_loss, gen_loss, real_cost, fake_cost
