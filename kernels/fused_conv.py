"""A convolution that applies the preceding BatchNorm and ReLU as it loads its input, and sums its output per
channel for the following BatchNorm: one implicit-GEMM kernel in place of a BatchNorm pass, a ReLU pass and
a convolution (the networks' BatchNorm -> ReLU -> convolution, --fuse-bn-relu).

bn_relu_conv(x, scale, shift, weight, bias, stride, padding, with_sums=True) -> (y, channel_sum, channel_sumsq):
  a = relu(x * scale[c] + shift[c])          (scale, shift: the BatchNorm's affine map, float32, per channel)
  y = conv2d(a, weight, bias, stride, padding)
  channel_sum[o] = sum of y[:, o], channel_sumsq[o] = sum of y[:, o]^2   (float32, over batch and pixels)
x, y are channels-last (NHWC in memory); the zero padding is applied after the prologue, as the unfused
convolution pads the BatchNorm/ReLU output. The product accumulates in float32 from operands in the
weight's dtype (float32 operands in TF32 where torch.backends.cudnn.allow_tf32 lets cuDNN's convolutions
use it, as it does by default); y is in the weight's dtype. The sums are taken from the float32
accumulator, per block of output pixels, and added in torch (no atomics: deterministic); with_sums=False
(no BatchNorm follows) skips them.

Backward (in torch): the activation a is recomputed from x (it is never stored), the convolution's
gradients come from aten's convolution_backward, and the sums' gradients join y's (d sum/dy = 1,
d sumsq/dy = 2y). The reference is bn_relu_conv_reference in kernels/reference.py.
"""
import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op

from . import interpreter_enabled
from .launch import launcher

BLOCK_M = 128 if interpreter_enabled() else 64  # output pixels per program (the interpreter's cost is per program)


@triton.jit
def _bn_relu_conv_forward(x_ptr, scale_ptr, shift_ptr, w_ptr, bias_ptr, y_ptr, sum_ptr, sumsq_ptr,
                          H, W, Ho, Wo, Cout, M, stride, padding, C: tl.constexpr, HAS_BIAS: tl.constexpr, KH: tl.constexpr,
                          KW: tl.constexpr, IEEE: tl.constexpr, SUMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    # C (input channels) is a compile-time constant: the bound of the channel loop, one compilation per layer
    # width (Triton 3.6's interpreter cannot take a runtime loop bound under NumPy 2.4)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (n, oh, ow), flattened
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    row_ok = rows < M
    col_ok = cols < Cout
    n = rows // (Ho * Wo)
    oh = (rows // Wo) % Ho
    ow = rows % Wo
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in range(KH * KW):
        ih = oh * stride - padding + tap // KW
        iw = ow * stride - padding + tap % KW
        pixel_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pixel = ((n.to(tl.int64) * H + ih) * W + iw) * C
        for c0 in range(0, C, BLOCK_K):
            ks = c0 + tl.arange(0, BLOCK_K)
            k_ok = ks < C
            a_ok = pixel_ok[:, None] & k_ok[None, :]
            a = tl.load(x_ptr + pixel[:, None] + ks[None, :], mask=a_ok, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + ks, mask=k_ok, other=0.0)
            shift = tl.load(shift_ptr + ks, mask=k_ok, other=0.0)
            a = tl.maximum(a * scale[None, :] + shift[None, :], 0.0)
            a = tl.where(a_ok, a, 0.0)  # the padding is zero after BatchNorm and ReLU
            w = tl.load(w_ptr + (tap * C + ks)[:, None] * Cout + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)
            if IEEE:  # float32 operands multiplied in float32 (not TF32: torch.backends.cudnn.allow_tf32 off)
                acc += tl.dot(a.to(w.dtype), w, input_precision="ieee")
            else:
                acc += tl.dot(a.to(w.dtype), w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * Cout + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_ok)
    if SUMS:
        acc = tl.where(out_ok, acc, 0.0)
        tl.store(sum_ptr + pid_m * Cout + cols, tl.sum(acc, axis=0), mask=col_ok)
        tl.store(sumsq_ptr + pid_m * Cout + cols, tl.sum(acc * acc, axis=0), mask=col_ok)


def _block(size, least, most):
    return max(least, min(most, triton.next_power_of_2(size)))


def launch_config(channels, out_channels):
    """The block sizes and launch options of a convolution from `channels` to `out_channels` (kernels/aot.py
    compiles each one the networks launch, and requires no spills)."""
    block_n = _block(out_channels, 16, 128)
    return (dict(BLOCK_N=block_n, BLOCK_K=_block(channels, 16, 32)),
            dict(num_warps=8 if block_n >= 64 else 4, num_stages=2))


def output_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def _forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None, stride: int, padding: int, with_sums: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    ho, wo = output_size(height, kh, stride, padding), output_size(width, kw, stride, padding)
    m = batch * ho * wo
    x = x.contiguous(memory_format=torch.channels_last)
    w = weight.permute(2, 3, 1, 0).contiguous()  # (kh, kw, C, Cout): row (tap * C + c) of a (K, Cout) matrix
    y = torch.empty(batch, out_channels, ho, wo, device=x.device, dtype=weight.dtype,
                    memory_format=torch.channels_last)
    blocks, options = launch_config(channels, out_channels)
    blocks_m = triton.cdiv(m, BLOCK_M)
    # (without the sums: empty, and nothing is stored to them)
    partial_sum = torch.empty(blocks_m if with_sums else 0, out_channels, device=x.device, dtype=torch.float32)
    partial_sumsq = torch.empty_like(partial_sum)
    grid = (blocks_m, triton.cdiv(out_channels, blocks["BLOCK_N"]))
    launcher(_bn_relu_conv_forward)[grid](
        x, scale, shift, w, w if bias is None else bias, y, partial_sum, partial_sumsq, height, width, ho, wo,
        out_channels, m, stride, padding, C=channels, HAS_BIAS=bias is not None, KH=kh, KW=kw,
        IEEE=weight.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32, SUMS=with_sums, BLOCK_M=BLOCK_M,
        **blocks, **options)
    if not with_sums:
        return y, partial_sum.new_empty(0), partial_sumsq.new_empty(0)
    return y, partial_sum.sum(0), partial_sumsq.sum(0)


def _fake(x, scale, shift, weight, bias, stride, padding, with_sums):
    batch, _, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    shape = (batch, out_channels, output_size(height, kh, stride, padding), output_size(width, kw, stride, padding))
    y = x.new_empty(shape, dtype=weight.dtype).contiguous(memory_format=torch.channels_last)
    sums = out_channels if with_sums else 0
    return y, x.new_empty(sums, dtype=torch.float32), x.new_empty(sums, dtype=torch.float32)


# As kernels/rmsprop.py: a triton_op on a GPU (torch.compile traces the launch); under the interpreter an
# opaque custom op, which a compiled CPU step still calls.
if interpreter_enabled():
    _op = custom_op("vaegan::bn_relu_conv", _forward, mutates_args=())
    _op.register_fake(_fake)
else:
    _op = triton_op("vaegan::bn_relu_conv", _forward, mutates_args=())


def _setup_context(ctx, inputs, output):
    x, scale, shift, weight, bias, stride, padding, with_sums = inputs
    ctx.save_for_backward(x, scale, shift, weight, output[0])
    ctx.has_bias, ctx.stride, ctx.padding, ctx.with_sums = bias is not None, stride, padding, with_sums


def _backward(ctx, grad_y, grad_sum, grad_sumsq):
    x, scale, shift, weight, y = ctx.saved_tensors
    # a frozen pass (detached weights) takes no weight gradient, a first layer's input none
    need_input = any(ctx.needs_input_grad[:3])
    need_weight, need_bias = ctx.needs_input_grad[3], ctx.has_bias and ctx.needs_input_grad[4]
    affine = (1, -1, 1, 1)
    pre = x.float() * scale.view(affine) + shift.view(affine)
    a = pre.clamp_min(0).to(weight.dtype)
    grad = grad_y
    if ctx.with_sums:  # d sum/dy = 1, d sumsq/dy = 2y (custom ops hand unused outputs zeros, never None)
        grad = grad_y.float() + grad_sum.view(affine) + 2 * y.float() * grad_sumsq.view(affine)
    grad = grad.to(weight.dtype).contiguous(memory_format=torch.channels_last)
    a = a.contiguous(memory_format=torch.channels_last)
    grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad, a, weight, [weight.shape[0]] if ctx.has_bias else None, [ctx.stride] * 2, [ctx.padding] * 2, [1, 1],
        False, [0, 0], 1, (need_input, need_weight, need_bias))
    if not need_input:
        return None, None, None, grad_w, grad_b, None, None, None
    grad_pre = torch.where(pre > 0, grad_a.float(), 0.0)
    grad_x = (grad_pre * scale.view(affine)).to(x.dtype)
    grad_scale = (grad_pre * x.float()).sum((0, 2, 3))
    grad_shift = grad_pre.sum((0, 2, 3))
    return grad_x, grad_scale, grad_shift, grad_w, grad_b, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def bn_relu_conv(x, scale, shift, weight, bias=None, stride=1, padding=0, with_sums=True):
    """(y, channel_sum, channel_sumsq) of conv2d(relu(x * scale + shift), weight, bias), square kernel, one
    stride and padding for both axes, y channels-last; see the module's docstring. with_sums=False: the sums
    are neither computed nor differentiated (empty tensors), for a y that no BatchNorm follows."""
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"bn_relu_conv: input {tuple(x.shape)} and weight {tuple(weight.shape)} are not an "
                         "(N, C, H, W) batch and a (Cout, C, kh, kw) convolution weight")
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (x.shape[1],) or t.dtype != torch.float32:
            raise ValueError(f"bn_relu_conv: {name} must be float32 of shape ({x.shape[1]},), not {t.dtype} "
                             f"{tuple(t.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bn_relu_conv: bias {tuple(bias.shape)} does not match {weight.shape[0]} output channels")
    if bias is not None:
        bias = bias.to(weight.dtype)
    return _op(x.to(weight.dtype), scale, shift, weight, bias, stride, padding, with_sums)
