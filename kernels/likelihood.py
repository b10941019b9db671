"""Fused feature-space Gaussian likelihood: per sample 1/2 ||fake - real||^2 over all features.

Forward: one read of both feature maps, partial sums per (row, chunk) in fp32, then a small
sum over chunks (deterministic: no atomics). Backward: one elementwise pass,
grad_fake = grad[row] * (fake - real). The real features are a target: no gradient reaches them.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .checks import check_batch
from .launch import launcher

BLOCK = 1024
CHUNK_BLOCKS = 4  # each forward program sums BLOCK * CHUNK_BLOCKS features of one row


@triton.jit
def _feature_nll_forward(fake_ptr, real_ptr, partial_ptr, features, chunks, BLOCK: tl.constexpr,
                         CHUNK_BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(CHUNK_BLOCKS):
        cols = (chunk * CHUNK_BLOCKS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < features
        fake = tl.load(fake_ptr + row * features + cols, mask=mask, other=0.0).to(tl.float32)
        real = tl.load(real_ptr + row * features + cols, mask=mask, other=0.0).to(tl.float32)
        diff = fake - real
        acc += diff * diff
    tl.store(partial_ptr + row * chunks + chunk, 0.5 * tl.sum(acc, axis=0))


@triton.jit
def _feature_nll_backward(fake_ptr, real_ptr, grad_ptr, grad_fake_ptr, features, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < features
    fake = tl.load(fake_ptr + row * features + cols, mask=mask, other=0.0).to(tl.float32)
    real = tl.load(real_ptr + row * features + cols, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + row).to(tl.float32)
    tl.store(grad_fake_ptr + row * features + cols, (grad * (fake - real)).to(grad_fake_ptr.dtype.element_ty),
             mask=mask)


@triton_op("vaegan::feature_nll_forward", mutates_args={})
def _forward(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    rows, features = fake.shape
    chunks = triton.cdiv(features, BLOCK * CHUNK_BLOCKS)
    partial = torch.empty(rows, chunks, device=fake.device, dtype=torch.float32)
    launcher(_feature_nll_forward)[(rows, chunks)](fake, real, partial, features, chunks, BLOCK=BLOCK,
                                                      CHUNK_BLOCKS=CHUNK_BLOCKS)
    return partial.sum(dim=1)


@triton_op("vaegan::feature_nll_backward", mutates_args={})
def _backward(fake: torch.Tensor, real: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    rows, features = fake.shape
    grad_fake = torch.empty_like(fake)
    launcher(_feature_nll_backward)[(rows, triton.cdiv(features, BLOCK))](fake, real, grad, grad_fake, features,
                                                                             BLOCK=BLOCK)
    return grad_fake


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _autograd_backward(ctx, grad):
    fake, real = ctx.saved_tensors
    return _backward(fake, real, grad.contiguous()), None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def feature_nll(features_fake, features_real):
    """(B,) float32: 1/2 ||fake - real||^2 per sample, any shape after the batch dimension."""
    check_batch("feature_nll", features_fake=features_fake, features_real=features_real)
    rows = features_fake.shape[0]
    fake = features_fake.contiguous().reshape(rows, -1)
    real = features_real.detach().contiguous().reshape(rows, -1).to(fake.dtype)
    return _forward(fake, real)

