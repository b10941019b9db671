"""--fuse-bn-relu: each BatchNorm2d -> ReLU -> Conv2d of the networks computed by one kernel
(kernels.bn_relu_conv), which applies the BatchNorm's affine map and the ReLU as the convolution loads its
input and sums its output per channel for the next BatchNorm.

The same maths as the modules, with other rounding: the batch statistics come from the kernel's float32 sums
(var = E[y^2] - mean^2, whose relative error is about 1e-7 (1 + mean^2 / var): negligible unless a channel's
mean is hundreds of times its standard deviation, which no BatchNorm input here approaches) when the
convolution before the BatchNorm was fused too, else from torch; the running statistics are updated as
nn.BatchNorm2d updates them. Where it applies (is_fusable_triple): at 64 px the encoder's second and third
convolutions, the discriminator's third and fourth (Dis_l) and the decoder's last (at 32 px, one stage
fewer: the encoder's second, the discriminator's third, the decoder's last); not the joint decoder call,
which has its own per-half layers, and not a convolution that --pad-channels pads (the option asked for
wins; the start line names the fused convolutions). The parameters and buffers are the modules' own: a
checkpoint does not depend on the option.
"""
import torch
from torch import nn


def update_running_statistics(norm, mean, var, count):
    """What a training-mode BatchNorm does to its running statistics, given a batch's per-channel mean and
    (biased) variance over `count` values each."""
    if not (norm.training and norm.track_running_stats):
        return
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
        factor = norm.momentum if norm.momentum is not None else (1.0 / norm.num_batches_tracked).to(mean.dtype)
        norm.running_mean.lerp_(mean.detach().to(norm.running_mean.dtype), factor)
        unbiased = var.detach() * count / max(count - 1, 1)
        norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), factor)


def batch_norm_affine(norm, h, sums=None):
    """(scale, shift), float32 per channel, such that norm(h) = h * scale + shift. With batch statistics (a
    training-mode BatchNorm), from `sums` = (per-channel sum, sum of squares) of h when given, else computed
    from h; the running statistics are updated."""
    if norm.training or not norm.track_running_stats:
        count = h.numel() // h.shape[1]
        if sums is None:
            var, mean = torch.var_mean(h.float(), dim=(0, 2, 3), unbiased=False)
        else:
            mean = sums[0] / count
            var = (sums[1] / count - mean * mean).clamp_min(0)
        update_running_statistics(norm, mean, var, count)
    else:
        mean, var = norm.running_mean.float(), norm.running_var.float()
    scale = torch.rsqrt(var + norm.eps)
    if norm.affine:
        scale = scale * norm.weight.float()
    shift = -mean * scale
    if norm.affine:
        shift = shift + norm.bias.float()
    return scale, shift


def _fusable_conv(conv):
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and len(set(conv.padding)) == 1 and len(set(conv.stride)) == 1
            and conv.dilation == (1, 1) and conv.kernel_size[0] == conv.kernel_size[1])


def is_fusable_triple(layers, i):
    """layers[i:i + 3] is BatchNorm2d (not a synchronised one), ReLU, a plain convolution (not a subclass: a
    padded one computes otherwise)."""
    return (i + 2 < len(layers) and type(layers[i]) is nn.BatchNorm2d and type(layers[i + 1]) is nn.ReLU
            and _fusable_conv(layers[i + 2]))


def forward_layers(layers, h, fused):
    """layers(h) (an nn.Sequential), with each fusable triple computed by kernels.bn_relu_conv when `fused`."""
    if not fused:
        return layers(h)
    import kernels

    sums, i = None, 0  # sums: (per-channel sum, sum of squares) of h, when the kernel that made h gave them
    while i < len(layers):
        if not is_fusable_triple(layers, i):
            h, sums, i = layers[i](h), None, i + 1
            continue
        norm, conv = layers[i], layers[i + 2]
        scale, shift = batch_norm_affine(norm, h, sums)
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        h, *sums = kernels.bn_relu_conv(h, scale, shift, conv.weight.to(dtype), conv.bias, conv.stride[0],
                                        conv.padding[0], with_sums=is_fusable_triple(layers, i + 3))
        i += 3
    return h


# Each network's Sequentials that forward_layers runs, by attribute name (models.py calls it on these).
FUSED_SEQUENTIALS = {"encoder": ("body",), "decoder": ("body",), "discriminator": ("features",)}


def fuse_bn_relu(model, skip=()):
    """Turn --fuse-bn-relu on for each of `model`'s networks not in `skip`; returns the names of the
    convolutions that are now computed with their BatchNorm and ReLU."""
    fused = []
    for name, network in model.networks().items():
        if name in skip:
            continue
        network.fused_bn_relu = True
        for attribute in FUSED_SEQUENTIALS[name]:
            layers = getattr(network, attribute)
            fused += [f"{name}.{attribute}.{i + 2}" for i in range(len(layers)) if is_fusable_triple(layers, i)]
    return fused
