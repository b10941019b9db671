"""Fused Triton kernels for the VAE/GAN's losses, each with a plain PyTorch reference beside it.

    reparam_kl(mu, logvar, seed, row_offset=0) -> (z, kl)       kernels/reparam.py
    feature_nll(features_fake, features_real) -> (B,)          kernels/likelihood.py
    gan_loss(logits_real, logits_fake, real_weight, fake_weight)
        -> (dis_loss, gen_loss, real_cost, fake_cost)           kernels/gan.py

The ops are torch.library.triton_op custom ops with autograd, so torch.compile traces into
them. On a CPU they run only under Triton's interpreter: TRITON_INTERPRET=1 must be set
before this package's kernels are first imported. `import kernels` itself never needs triton.
"""
import importlib
import os

OPS = {"reparam_kl": "reparam", "reparam_kl_reference": "reparam",
       "feature_nll": "likelihood", "feature_nll_reference": "likelihood",
       "gan_loss": "gan", "gan_loss_reference": "gan"}


def interpreter_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device_type):
    """None if the Triton kernels can run on `device_type` here, else why not (one sentence)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install triton"
    if device_type == "cuda":
        return None
    if interpreter_enabled():
        return None
    return (f"Triton kernels need a CUDA device, and this run is on {device_type}; on a CPU they run only "
            "under Triton's interpreter (set TRITON_INTERPRET=1 before starting: slow, meant for tests)")


def __getattr__(name):
    if name in OPS:
        return getattr(importlib.import_module(f".{OPS[name]}", __name__), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
