"""Fused reparameterisation and KL: z = mu + exp(logvar/2) * eps and the per-sample KL, one pass.

eps is drawn inside the kernel from Philox at (seed, element offset) and drawn again in the
backward pass: nothing random is stored. The seed travels as a one-element int64 tensor on the
device, read by the kernel: a new seed every step is new data, not a new kernel argument, so it
neither recompiles nor invalidates a captured CUDA graph. Row r of a batch uses offsets
(row_offset + r) * D + c, so ranks of a data-parallel run draw disjoint slices of one global
stream (see kernels/philox.py, which computes the same numbers in PyTorch).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import philox
from .checks import check_matrix
from .launch import launcher


@triton.jit(do_not_specialize=["row_offset"])
def _reparam_kl_forward(mu_ptr, logvar_ptr, z_ptr, kl_ptr, seed_ptr, row_offset, columns, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    seed = tl.load(seed_ptr)
    cols = tl.arange(0, BLOCK)
    mask = cols < columns
    index = row * columns + cols
    mu = tl.load(mu_ptr + index, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + index, mask=mask, other=0.0).to(tl.float32)
    eps = tl.randn(seed, (row_offset + row) * columns + cols)
    var = tl.exp(logvar)
    z = mu + tl.exp(0.5 * logvar) * eps
    tl.store(z_ptr + index, z.to(z_ptr.dtype.element_ty), mask=mask)
    terms = tl.where(mask, 1.0 + logvar - mu * mu - var, 0.0)
    tl.store(kl_ptr + row, -0.5 * tl.sum(terms, axis=0))


@triton.jit(do_not_specialize=["row_offset"])
def _reparam_kl_backward(mu_ptr, logvar_ptr, grad_z_ptr, grad_kl_ptr, grad_mu_ptr, grad_logvar_ptr, seed_ptr,
                         row_offset, columns, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    seed = tl.load(seed_ptr)
    cols = tl.arange(0, BLOCK)
    mask = cols < columns
    index = row * columns + cols
    mu = tl.load(mu_ptr + index, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + index, mask=mask, other=0.0).to(tl.float32)
    grad_z = tl.load(grad_z_ptr + index, mask=mask, other=0.0).to(tl.float32)
    grad_kl = tl.load(grad_kl_ptr + row).to(tl.float32)
    eps = tl.randn(seed, (row_offset + row) * columns + cols)  # the forward's eps, drawn again
    std = tl.exp(0.5 * logvar)
    grad_mu = grad_z + grad_kl * mu
    grad_logvar = 0.5 * grad_z * std * eps + 0.5 * grad_kl * (std * std - 1.0)
    tl.store(grad_mu_ptr + index, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_logvar_ptr + index, grad_logvar.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


@triton_op("vaegan::reparam_kl_forward", mutates_args={})
def _forward(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor, row_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, columns = mu.shape
    z = torch.empty_like(mu)
    kl = torch.empty(rows, device=mu.device, dtype=torch.float32)
    launcher(_reparam_kl_forward)[(rows,)](mu, logvar, z, kl, seed, row_offset, columns,
                                              BLOCK=triton.next_power_of_2(columns))
    return z, kl


@triton_op("vaegan::reparam_kl_backward", mutates_args={})
def _backward(mu: torch.Tensor, logvar: torch.Tensor, grad_z: torch.Tensor, grad_kl: torch.Tensor, seed: torch.Tensor,
              row_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, columns = mu.shape
    grad_mu = torch.empty_like(mu)
    grad_logvar = torch.empty_like(logvar)
    launcher(_reparam_kl_backward)[(rows,)](mu, logvar, grad_z, grad_kl, grad_mu, grad_logvar, seed,
                                               row_offset, columns, BLOCK=triton.next_power_of_2(columns))
    return grad_mu, grad_logvar


def _setup_context(ctx, inputs, output):
    mu, logvar, seed, row_offset = inputs
    ctx.save_for_backward(mu, logvar, seed)
    ctx.row_offset = row_offset


def _autograd_backward(ctx, grad_z, grad_kl):
    mu, logvar, seed = ctx.saved_tensors
    grad_z = torch.zeros_like(mu) if grad_z is None else grad_z.contiguous()
    grad_kl = torch.zeros(mu.shape[0], device=mu.device, dtype=torch.float32) if grad_kl is None else grad_kl.contiguous()
    grad_mu, grad_logvar = _backward(mu, logvar, grad_z, grad_kl, seed, ctx.row_offset)
    return grad_mu, grad_logvar, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def reparam_kl(mu, logvar, seed, row_offset=0):
    """(z, kl): z (B, D) in mu's dtype, kl (B,) in float32. Gradients reach mu and logvar from both.
    seed: an int or an integer tensor of one element (taken modulo 2**31)."""
    check_matrix("reparam_kl", mu=mu, logvar=logvar)
    return _forward(mu.contiguous(), logvar.contiguous(), philox.seed_tensor(seed, mu.device), int(row_offset))
