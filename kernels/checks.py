"""Argument checks shared by the fused ops: clear errors instead of garbage from a kernel."""
import torch


def check_batch(op, **tensors):
    """Same shape, a floating dtype, one device, a non-empty batch dimension."""
    (first_name, first), *rest = tensors.items()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor")
        if t.dim() < 1 or t.shape[0] == 0:
            raise ValueError(f"{op}: {name} has an empty batch (shape {tuple(t.shape)})")
    for name, t in rest:
        if t.shape != first.shape or t.device != first.device:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} on {t.device} does not match "
                             f"{first_name} {tuple(first.shape)} on {first.device}")


def check_matrix(op, **tensors):
    check_batch(op, **tensors)
    for name, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be (batch, features), got shape {tuple(t.shape)}")
