"""Fused GAN log-losses from logits, with the equilibrium statistics from the same pass.

gan_loss(logits_real, logits_fake, real_weight, fake_weight) returns four 0-d float32 tensors:
  dis_loss  = real_weight * mean(-log Dis(x)) + fake_weight * mean(-log(1 - Dis(fake)))
  gen_loss  = fake_weight * mean(-log Dis(fake))      (the non-saturating decoder term)
  real_cost = mean(-log(Dis(x) + 1e-3)), fake_cost = mean(-log(1 - Dis(fake) + 1e-3))
(the last two are the authors' equilibrium statistics: no gradient). They stay on the device:
the step reads them once, in its one synchronisation. The minimax decoder term is -dis_loss.
Forward: one block of logits per program, five partial sums each, added up in a fixed order
afterwards (deterministic: no atomics; no loop over a runtime bound).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .checks import check_batch
from .launch import launcher

BLOCK = 1024
LOG_EPS = 1e-3


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) without overflow
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _gan_loss_forward(real_ptr, fake_ptr, partial_ptr, n_real, n_fake, BLOCK: tl.constexpr, LOG_EPS: tl.constexpr):
    # one block of logits per program; five partial sums each, added up in a fixed order afterwards
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_real
    x = tl.load(real_ptr + i, mask=mask, other=0.0).to(tl.float32)
    real_loss = tl.sum(tl.where(mask, _softplus(-x), 0.0), axis=0)
    real_cost = tl.sum(tl.where(mask, -tl.log(tl.sigmoid(x) + LOG_EPS), 0.0), axis=0)
    mask = i < n_fake
    x = tl.load(fake_ptr + i, mask=mask, other=0.0).to(tl.float32)
    fake_loss = tl.sum(tl.where(mask, _softplus(x), 0.0), axis=0)
    gen_loss = tl.sum(tl.where(mask, _softplus(-x), 0.0), axis=0)
    fake_cost = tl.sum(tl.where(mask, -tl.log(tl.sigmoid(-x) + LOG_EPS), 0.0), axis=0)
    out = partial_ptr + tl.program_id(0) * 5
    tl.store(out + 0, real_loss)
    tl.store(out + 1, fake_loss)
    tl.store(out + 2, gen_loss)
    tl.store(out + 3, real_cost)
    tl.store(out + 4, fake_cost)


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
    n_real, n_fake = logits_real.numel(), logits_fake.numel()
    blocks = triton.cdiv(max(n_real, n_fake), BLOCK)
    partial = torch.empty(blocks, 5, device=logits_real.device, dtype=torch.float32)
    launcher(_gan_loss_forward)[(blocks,)](logits_real, logits_fake, partial, n_real, n_fake, BLOCK=BLOCK,
                                           LOG_EPS=LOG_EPS)
    real_loss, fake_loss, gen_loss, real_cost, fake_cost = partial.sum(dim=0).unbind()
    return torch.stack([real_weight / n_real * real_loss + fake_weight / n_fake * fake_loss,
                        fake_weight / n_fake * gen_loss, real_cost / n_real, fake_cost / n_fake])


@triton_op("vaegan::gan_loss_backward", mutates_args={})
def _backward(logits_real: torch.Tensor, logits_fake: torch.Tensor, grad: torch.Tensor, real_weight: float,
              fake_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    grad_real = torch.empty_like(logits_real)
    grad_fake = torch.empty_like(logits_fake)
    n_real, n_fake = logits_real.numel(), logits_fake.numel()
    grid = (triton.cdiv(max(n_real, n_fake), BLOCK),)
    launcher(_gan_loss_backward)[grid](logits_real, logits_fake, grad, grad_real, grad_fake, n_real, n_fake,
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

