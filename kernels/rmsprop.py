"""The masked RMSprop update of one parameter tensor, in one kernel that reads its keep flag first.

masked_rmsprop_(param, grad, square_avg, update, lr, weight_decay=0.0, alpha=0.9, eps=1e-8) is torch's
RMSprop (centered=False, momentum=0, coupled weight decay), per element, kept only where `update`
(a 0-d bool tensor on the device) is True:
  g = grad + weight_decay * param          (only when weight_decay != 0)
  square_avg = alpha * square_avg + (1 - alpha) * g * g
  param = param - lr * g / (sqrt(square_avg) + eps)
param and square_avg are written in place. Each program loads the flag and returns at once when it
is False: a skipped network's parameters, gradients and state are neither read nor written. lr is a
tensor on the device that the kernel reads (a new rate is new data, not a recompile); a Python float
is turned into one. The tensors are float32, any dense layout they share (a channels-last weight
too: the update is elementwise, so the kernel walks their memory in order).

On a GPU the op is a torch.library.triton_op, so torch.compile (and CUDA graphs) trace the launch into
their graph. Under Triton's interpreter the kernel can only run on real data, so the op is an opaque
custom op there (a call in the traced graph, with no fake work): a compiled step still runs it.
"""
import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op

from . import interpreter_enabled
from .launch import launcher

BLOCK = 1 << 16 if interpreter_enabled() else 1024  # the interpreter's cost is per program


@triton.jit
def _masked_rmsprop(param_ptr, grad_ptr, square_avg_ptr, update_ptr, lr_ptr, n, weight_decay, alpha, one_minus_alpha,
                    eps, DECAY: tl.constexpr, BLOCK: tl.constexpr):
    if tl.load(update_ptr) == 0:  # skipped: nothing else is read or written
        return
    lr = tl.load(lr_ptr).to(tl.float32)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    p = tl.load(param_ptr + i, mask=mask)
    g = tl.load(grad_ptr + i, mask=mask)
    square_avg = tl.load(square_avg_ptr + i, mask=mask)
    if DECAY:
        g = tl.fma(p, weight_decay, g)  # one rounding, as torch's grad.add(param, alpha=weight_decay)
    # torch's order: the decayed gradient enters the average, and the new average divides this step
    square_avg = alpha * square_avg + one_minus_alpha * g * g
    # (lr * g) / denominator, as torch's addcdiv_ on the CPU (on CUDA it divides first: a rounding apart);
    # IEEE-rounded, as CUDA's
    p = p - tl.div_rn(lr * g, tl.sqrt_rn(square_avg) + eps)
    tl.store(square_avg_ptr + i, square_avg, mask=mask)
    tl.store(param_ptr + i, p, mask=mask)


def _launch(param: torch.Tensor, grad: torch.Tensor, square_avg: torch.Tensor, update: torch.Tensor,
            lr: torch.Tensor, weight_decay: float, alpha: float, eps: float) -> None:
    n = param.numel()
    launcher(_masked_rmsprop)[(triton.cdiv(n, BLOCK),)](param, grad, square_avg, update, lr, n, weight_decay, alpha,
                                                        1.0 - alpha, eps, DECAY=weight_decay != 0, BLOCK=BLOCK)


if interpreter_enabled():
    _op = custom_op("vaegan::masked_rmsprop_", _launch, mutates_args={"param", "square_avg"})
    _op.register_fake(lambda *args: None)
else:
    _op = triton_op("vaegan::masked_rmsprop_", _launch, mutates_args={"param", "square_avg"})


def _dense_layout(t):
    """The strides of t's dimensions of more than one element (a size-1 dimension's stride is arbitrary) when
    its elements fill its memory without gaps or overlaps, in some order of dimensions; else None."""
    strides = [(stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1]
    filled = 1
    for stride, size in sorted(strides):
        if stride != filled:
            return None
        filled *= size
    return tuple(stride for stride, _ in strides)


def masked_rmsprop_(param, grad, square_avg, update, lr, weight_decay=0.0, alpha=0.9, eps=1e-8):
    """One RMSprop step of `param` (and its `square_avg`) in place, kept only where `update` is True."""
    for name, t in (("param", param), ("grad", grad), ("square_avg", square_avg)):
        if t.dtype != torch.float32:
            raise TypeError(f"masked_rmsprop_: {name} must be float32, not {t.dtype}")
        if t.shape != param.shape or t.device != param.device:
            raise ValueError(f"masked_rmsprop_: {name} {tuple(t.shape)} on {t.device} does not match param "
                             f"{tuple(param.shape)} on {param.device}")
        if _dense_layout(t) is None or _dense_layout(t) != _dense_layout(param):
            raise ValueError(f"masked_rmsprop_: {name} (strides {t.stride()}) is not dense in param's layout "
                             f"(strides {param.stride()}): param, grad and square_avg must share one dense layout")
    if not isinstance(lr, torch.Tensor):
        lr = torch.full((), lr, dtype=torch.float32, device=param.device)  # a fill on the device, no copy
    for name, t in (("update", update), ("lr", lr)):
        if t.numel() != 1 or t.device != param.device:
            raise ValueError(f"masked_rmsprop_: {name} must be one element on {param.device}, "
                             f"not shape {tuple(t.shape)} on {t.device}")
    if update.dtype != torch.bool:
        raise TypeError(f"masked_rmsprop_: update must be a bool tensor, not {update.dtype}")
    if param.numel():
        _op(param, grad, square_avg, update, lr, float(weight_decay), float(alpha), float(eps))
