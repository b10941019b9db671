"""Fused Triton kernels for the VAE/GAN's losses and its RMSprop, each with a plain PyTorch reference beside it.

    reparam_kl(mu, logvar, seed, row_offset=0) -> (z, kl)       kernels/reparam.py
    feature_nll(features_fake, features_real) -> (B,)          kernels/likelihood.py
    gan_loss(logits_real, logits_fake, real_weight, fake_weight)
        -> (dis_loss, gen_loss, real_cost, fake_cost)           kernels/gan.py
    masked_rmsprop_(param, grad, square_avg, update, lr, weight_decay, alpha, eps)
        -> None: one RMSprop step in place, kept where `update`  kernels/rmsprop.py
    bn_relu_conv(x, scale, shift, weight, bias, stride, padding)
        -> (y, channel_sum, channel_sumsq): BatchNorm's affine map and
        ReLU applied as the convolution loads x (--fuse-bn-relu)  kernels/fused_conv.py

Their references (`reparam_kl_reference`, ...) and the per-sample losses they are built from are in
kernels/reference.py, which needs no Triton. `op_set(name)` gives the step one set, chosen once:
the fused ops or their references (the optimizer's kernel is chosen by --optimizer-impl fused,
vaegan/optimizers.py; the convolution's by --fuse-bn-relu, vaegan/fused_layers.py). This package imports nothing from `vaegan`.

The ops are torch.library.triton_op custom ops (the losses' with autograd), so torch.compile traces
into them. On a CPU they run only under Triton's interpreter: TRITON_INTERPRET=1 must be set
before this package's kernels are first imported. `import kernels` itself never needs triton.
"""
import functools
import importlib
import os
from types import SimpleNamespace

OPS = {"reparam_kl": "reparam", "reparam_kl_reference": "reference",
       "feature_nll": "likelihood", "feature_nll_reference": "reference",
       "gan_loss": "gan", "gan_loss_reference": "reference",
       "masked_rmsprop_": "rmsprop", "masked_rmsprop_reference_": "reference",
       "bn_relu_conv": "fused_conv", "bn_relu_conv_reference": "reference"}
OP_SETS = ("torch", "triton")


def op_set(name, gan_loss_form="logits"):
    """The ops the step calls, reparam_kl, feature_nll and gan_loss (signatures above): "triton", the
    fused kernels (the exact log-loss from logits only); "torch", their references, in `gan_loss_form`
    ("logits", or "eps": the authors' log(p + 1e-3))."""
    if name == "triton":
        if gan_loss_form != "logits":
            raise ValueError(f"the fused gan_loss computes the log-loss from logits, not the {gan_loss_form!r} form")
        return SimpleNamespace(name=name, **{op: __getattr__(op) for op in ("reparam_kl", "feature_nll", "gan_loss")})
    if name == "torch":
        from . import reference
        return SimpleNamespace(name=name, reparam_kl=reference.reparam_kl_reference,
                               feature_nll=reference.feature_nll_reference,
                               gan_loss=functools.partial(reference.gan_loss_reference, form=gan_loss_form))
    raise ValueError(f"op set {name!r} is not one of {', '.join(OP_SETS)}")


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
