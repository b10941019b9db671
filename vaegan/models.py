"""The three networks of the VAE/GAN (Larsen et al. 2016), CelebA configuration (the authors' `architectures.py` `img64x64`).

64x64 images use three stride-2 stages; 32x32 images use one stage fewer, so that every
network still works on a 256x8x8 representation (and `Dis_l` is the 3rd convolution).
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .fused_layers import forward_layers, update_running_statistics

SUPPORTED_IMAGE_SIZES = (32, 64)
MODEL_KINDS = ("vaegan", "vae", "gan", "vae-disl", "cvaegan", "cvae", "cgan")
CONDITIONAL_KINDS = ("cvaegan", "cvae", "cgan")


def base_kind(kind):
    """The unconditional model a kind trains like: cvaegan -> vaegan, cvae -> vae, cgan -> gan."""
    return kind[1:] if kind in CONDITIONAL_KINDS else kind


def with_attribute_channels(x, y):
    """(N, C, H, W) images and (N, A) attributes -> (N, C + A, H, W): each attribute a constant channel."""
    if y is None:
        return x
    return torch.cat([x, y.to(x.dtype)[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])], 1)


def with_attributes(z, y):
    """(N, latent) codes and (N, A) attributes -> (N, latent + A)."""
    return z if y is None else torch.cat([z, y.to(z.dtype)], 1)

# Channels of the stride-2 stages, by image size.
ENCODER_STAGES = {64: (64, 128, 256), 32: (128, 256)}
DECODER_STAGES = {64: (256, 128, 32), 32: (128, 32)}
DISCRIMINATOR_STAGES = {64: (128, 256, 256), 32: (128, 256)}
BASE = 8  # spatial size of the innermost representation
BASE_CHANNELS = 256
CONV_BN_EPS = 1e-6  # the authors' value for convolutional BatchNorm; FC BatchNorm keeps 1e-5


def scaled(channels, width):
    """A channel count times the width multiplier (1: the paper's networks)."""
    return max(1, int(round(channels * width)))


def conv(in_ch, out_ch, stride, bias):
    return nn.Conv2d(in_ch, out_ch, 5, stride=stride, padding=2, bias=bias)


# How the decoder doubles its spatial size, stage by stage. transposed: the authors' 5x5 stride-2 transposed
# convolution. resize: nearest-neighbour upsampling, then a 3x3 convolution (Odena et al. 2016, "Deconvolution
# and checkerboard artifacts"): a constant input gives a constant output whatever the weights, so no
# checkerboard grows in it; the built-in demo's choice (bench/results/demo-faces/results.md).
UP_CONVS = {"transposed": "5x5 stride-2 transposed convolutions (the authors')",
            "resize": "nearest-neighbour resizing then 3x3 convolutions"}


def up_conv(in_ch, out_ch, kind="transposed"):
    """The layers of one decoder stage's upsampling: exactly doubles the spatial size."""
    if kind == "transposed":
        return [nn.ConvTranspose2d(in_ch, out_ch, 5, stride=2, padding=2, output_padding=1, bias=False)]
    if kind == "resize":
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)]
    raise ValueError(f"up_conv {kind!r} is not one of {', '.join(UP_CONVS)}")


def conv_bn_relu(in_ch, out_ch, stride):
    return [conv(in_ch, out_ch, stride, bias=False), nn.BatchNorm2d(out_ch, eps=CONV_BN_EPS), nn.ReLU()]


CHANNEL_MULTIPLE = 8  # bf16 tensor-core convolutions take channel counts in multiples of 8


class ChannelPaddedConv2d(nn.Conv2d):
    """A Conv2d computed with its input and output channels padded with zeros to multiples of
    CHANNEL_MULTIPLE: the same parameters (the padding is made at each call, and its gradient dropped),
    the same values. For the convolutions with 3 image channels (pad_thin_convolutions)."""

    def forward(self, x):
        pad_in, pad_out = -self.in_channels % CHANNEL_MULTIPLE, -self.out_channels % CHANNEL_MULTIPLE
        weight, bias = self.weight, self.bias
        if pad_in:
            layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
            x = F.pad(x, (0, 0, 0, 0, 0, pad_in))
            x = x if layout is None else x.contiguous(memory_format=layout)
            weight = F.pad(weight, (0, 0, 0, 0, 0, pad_in))
        if pad_out:
            weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, pad_out))
            bias = None if bias is None else F.pad(bias, (0, pad_out))
        out = self._conv_forward(x, weight, bias)
        return out[:, :self.out_channels] if pad_out else out


def pad_thin_convolutions(model):
    """Every (ungrouped) Conv2d of `model` whose channel counts are not multiples of CHANNEL_MULTIPLE (the
    paper's: the encoder's and discriminator's first, with the image's 3 channels plus a conditional model's
    attributes, and the decoder's last) computed padded; returns their names."""
    padded = []
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and m.groups == 1 and (m.in_channels % CHANNEL_MULTIPLE or m.out_channels % CHANNEL_MULTIPLE):
            m.__class__ = ChannelPaddedConv2d
            padded.append(name)
    return padded


def check_image_size(image_size):
    if image_size not in SUPPORTED_IMAGE_SIZES:
        raise ValueError(f"image size {image_size} is not supported: the networks take "
                         f"{' or '.join(map(str, SUPPORTED_IMAGE_SIZES))} pixels")


class Encoder(nn.Module):
    """Enc(x) -> (mu, logvar); conditional: Enc(x, y), y as constant input channels."""
    fused_bn_relu = False  # --fuse-bn-relu (fused_layers.fuse_bn_relu)

    def __init__(self, image_size=64, channels=3, latent_size=128, fc_width=1024, num_attributes=0, width=1.0):
        super().__init__()
        check_image_size(image_size)
        layers, in_ch = [], channels + num_attributes
        for out_ch in ENCODER_STAGES[image_size]:
            layers += conv_bn_relu(in_ch, scaled(out_ch, width), stride=2)
            in_ch = scaled(out_ch, width)
        layers += [nn.Flatten(), nn.Linear(in_ch * BASE * BASE, fc_width, bias=False),
                   nn.BatchNorm1d(fc_width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.mu = nn.Linear(fc_width, latent_size)
        self.logvar = nn.Linear(fc_width, latent_size)

    def forward(self, x, y=None):
        h = forward_layers(self.body, with_attribute_channels(x, y), self.fused_bn_relu)
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    """Dec(z) -> image in [-1, 1]; also the GAN's generator. Conditional: Dec([z, y])."""
    fused_bn_relu = False  # --fuse-bn-relu (not in forward_joint)

    def __init__(self, image_size=64, channels=3, latent_size=128, num_attributes=0, width=1.0,
                 up_conv_kind="transposed"):
        super().__init__()
        check_image_size(image_size)
        in_ch = scaled(BASE_CHANNELS, width)
        layers = [nn.Linear(latent_size + num_attributes, in_ch * BASE * BASE, bias=False),
                  nn.BatchNorm1d(in_ch * BASE * BASE), nn.ReLU(), nn.Unflatten(1, (in_ch, BASE, BASE))]
        for out_ch in DECODER_STAGES[image_size]:
            out_ch = scaled(out_ch, width)
            layers += up_conv(in_ch, out_ch, up_conv_kind) + [nn.BatchNorm2d(out_ch, eps=CONV_BN_EPS), nn.ReLU()]
            in_ch = out_ch
        layers += [conv(in_ch, channels, stride=1, bias=True), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z, y=None):
        return forward_layers(self.body, with_attributes(z, y), self.fused_bn_relu)

    def forward_joint(self, z, z_other, y=None):
        """(Dec(z), Dec(z_other)) from one call over both halves (as many rows each), computing what two
        calls compute: each BatchNorm normalises each half with that half's own statistics, its running
        statistics follow the first half (the second is an extra pass, gradients.extra_pass), and each
        weight's gradient is taken per half and the halves summed in fp32 (summed in bf16 inside one
        product, the likelihood's 1e-4 share of the decoder's gradient would round away: tests/test_precision.py).
        A ChannelPaddedConv2d is padded here too. Training mode only."""
        n = z.shape[0]
        if z_other.shape[0] != n:
            raise ValueError(f"forward_joint takes halves of equal size, not {n} and {z_other.shape[0]} rows")
        h = torch.cat([with_attributes(z, y), with_attributes(z_other, y)])
        for layer in self.body:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                h = batch_norm_per_half(layer, h)
            elif isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                h = _WeightGradientPerHalf.apply(h, layer.weight, layer.bias, layer)
            else:
                h = layer(h)
        return h[:n], h[n:]


def batch_norm_per_half(norm, h):
    """`norm` (a training-mode BatchNorm) applied to each half of the batch h with that half's statistics,
    in fp32; the running statistics are updated from the first half only."""
    if not norm.training:
        raise RuntimeError("batch_norm_per_half normalises with batch statistics: the BatchNorm must be in training mode")
    halves = h.to(torch.promote_types(h.dtype, torch.float32)).unflatten(0, (2, -1))  # (2, n, C, ...)
    dims = [1] + list(range(3, halves.dim()))
    mean = halves.mean(dims, keepdim=True)
    var = halves.var(dims, unbiased=False, keepdim=True)
    affine = (1, -1) + (1,) * (halves.dim() - 3)
    out = (halves - mean) * torch.rsqrt(var + norm.eps)
    if norm.affine:
        out = out * norm.weight.view(affine) + norm.bias.view(affine)
    update_running_statistics(norm, mean[0].flatten(), var[0].flatten(), halves[0].numel() // halves.shape[2])
    return out.flatten(0, 1).to(h.dtype)


def _layer_call(layer, x, weight, bias):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d._conv_forward(layer, x, weight, bias)  # (unpadded: the caller pads)
    return F.conv_transpose2d(x, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups,
                              layer.dilation)


def _channel_pads(layer):
    """(input, output) channels of zeros a ChannelPaddedConv2d adds; (0, 0) for other layers."""
    if not isinstance(layer, ChannelPaddedConv2d):
        return 0, 0
    return -layer.in_channels % CHANNEL_MULTIPLE, -layer.out_channels % CHANNEL_MULTIPLE


class _WeightGradientPerHalf(torch.autograd.Function):
    """A linear, convolution or transposed convolution layer over a batch of two halves, in one call;
    backward: the input's gradient in one call, the weight's and bias's per half, summed in the weight's
    dtype. Computes in autocast's dtype when autocast is on, as the layer would, and padded as a
    ChannelPaddedConv2d is."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        pad_in, pad_out = _channel_pads(layer)
        with torch.autocast(device, enabled=False):
            x_c, w_c = x.to(dtype), weight.to(dtype)
            b_c = None if bias is None else bias.to(dtype)
            if pad_in:
                x_c, w_c = F.pad(x_c, (0, 0, 0, 0, 0, pad_in)), F.pad(w_c, (0, 0, 0, 0, 0, pad_in))
            if pad_out:
                w_c = F.pad(w_c, (0, 0, 0, 0, 0, 0, 0, pad_out))
                b_c = None if b_c is None else F.pad(b_c, (0, pad_out))
            out = _layer_call(layer, x_c, w_c, b_c)
        ctx.save_for_backward(x_c, w_c)
        ctx.layer, ctx.x_dtype, ctx.w_dtype, ctx.has_bias = layer, x.dtype, weight.dtype, bias is not None
        ctx.pads, ctx.weight_shape = (pad_in, pad_out), weight.shape
        return out[:, :out.shape[1] - pad_out] if pad_out else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        layer, (pad_in, pad_out) = ctx.layer, ctx.pads
        grad = grad.to(x.dtype)
        n = x.shape[0] // 2
        if isinstance(layer, nn.Linear):
            grad_x = grad @ w
            grad_w = [g.t() @ xh for g, xh in ((grad[:n], x[:n]), (grad[n:], x[n:]))]
            grad_b = [g.sum(0) for g in (grad[:n], grad[n:])]
        else:
            if pad_out:
                grad = F.pad(grad, (0, 0, 0, 0, 0, pad_out))
            transposed = isinstance(layer, nn.ConvTranspose2d)
            args = (layer.stride, layer.padding, layer.dilation, transposed,
                    layer.output_padding if transposed else (0, 0), layer.groups)
            bias_size = [w.shape[1] * layer.groups if transposed else w.shape[0]] if ctx.has_bias else None
            grad_x = torch.ops.aten.convolution_backward(grad, x, w, bias_size, *args, (True, False, False))[0]
            grad_w, grad_b = [], []
            for g, xh in ((grad[:n], x[:n]), (grad[n:], x[n:])):
                _, gw, gb = torch.ops.aten.convolution_backward(g, xh, w, bias_size, *args, (False, True, ctx.has_bias))
                grad_w.append(gw)
                grad_b.append(gb)
        out_channels, in_channels = ctx.weight_shape[:2]
        grad_w = (grad_w[0].to(ctx.w_dtype) + grad_w[1].to(ctx.w_dtype))[:out_channels, :in_channels]
        grad_b = (grad_b[0].to(ctx.w_dtype) + grad_b[1].to(ctx.w_dtype))[:out_channels] if ctx.has_bias else None
        grad_x = grad_x[:, :grad_x.shape[1] - pad_in] if pad_in else grad_x
        return grad_x.to(ctx.x_dtype), grad_w, grad_b, None


class Discriminator(nn.Module):
    """Dis(x) -> logit of "x is real"; `forward(x, features_only=True)` -> Dis_l(x).

    Dis_l is the output of the last convolution, before its BatchNorm and ReLU
    (256x8x8 = 16,384 features per image). Conditional: Dis(x, y), y as constant input channels.
    """

    def __init__(self, image_size=64, channels=3, num_attributes=0, width=1.0):
        super().__init__()
        check_image_size(image_size)
        stages = [scaled(c, width) for c in DISCRIMINATOR_STAGES[image_size]]
        in_ch, fc = scaled(32, width), scaled(512, width)
        layers = [conv(channels + num_attributes, in_ch, stride=1, bias=True), nn.ReLU()]
        for out_ch in stages[:-1]:
            layers += conv_bn_relu(in_ch, out_ch, stride=2)
            in_ch = out_ch
        layers.append(conv(in_ch, stages[-1], stride=2, bias=False))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.BatchNorm2d(stages[-1], eps=CONV_BN_EPS), nn.ReLU(), nn.Flatten(),
            nn.Linear(stages[-1] * BASE * BASE, fc, bias=False), nn.BatchNorm1d(fc), nn.ReLU(),
            nn.Linear(fc, 1))

    # The first convolution, its ReLU and the second convolution see one image at a time (the first
    # BatchNorm comes after them): the routed step computes them once for the real images.
    PER_IMAGE_LAYERS = 3
    fused_bn_relu = False  # --fuse-bn-relu

    def forward(self, x, y=None, features_only=False, per_image_only=False, from_per_image=False):
        """per_image_only: stop after the per-image layers; from_per_image: x is their output (y is then
        already in it)."""
        h = x if from_per_image else self.features[:self.PER_IMAGE_LAYERS](with_attribute_channels(x, y))
        if per_image_only:
            return h
        features = forward_layers(self.features[self.PER_IMAGE_LAYERS:], h, self.fused_bn_relu)
        if features_only:
            return features
        return self.head(features).squeeze(1)


def init_weights(module):
    """The authors' initialisation (DeepPy's AutoFiller): uniform with std 1/(3*sqrt(fan)), biases 0.

    fan is the product of the weight's shape after its first axis: in_features for a linear layer,
    in_channels*k*k for a convolution, and out_channels*k*k for a transposed convolution (whose
    weights both DeepPy and PyTorch store as (in, out, k, k)).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            fan = m.weight[0].numel()
            bound = math.sqrt(3.0) / (3.0 * math.sqrt(fan))  # uniform(-a, a) has std a/sqrt(3)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VAEGAN(nn.Module):
    """The networks a run trains: which exist depends on the model kind.

    vaegan, vae-disl: encoder, decoder, discriminator; vae: encoder, decoder; gan: decoder,
    discriminator. The conditional kinds (cvaegan, cvae, cgan: the paper's attribute-conditional generation) have the same
    networks as their base kind, and every network sees the attribute vector y (+-1 per
    attribute_names entry), as the authors' conditional code does: appended to z for the decoder,
    as constant channels appended to the image for the encoder (q(z | x, y)) and the discriminator.
    """

    def __init__(self, kind="vaegan", image_size=64, channels=3, latent_size=128, fc_width=1024, attribute_names=(),
                 width=1.0, up_conv="transposed"):
        super().__init__()
        if kind not in MODEL_KINDS:
            raise ValueError(f"model {kind!r} is not one of {', '.join(MODEL_KINDS)}")
        self.conditional = kind in CONDITIONAL_KINDS
        if self.conditional and not attribute_names:
            raise ValueError(f"model {kind!r} is conditional: it needs attribute names")
        if attribute_names and not self.conditional:
            raise ValueError(f"model {kind!r} is not conditional: it takes no attributes")
        self.kind = kind
        self.image_size, self.channels, self.latent_size = image_size, channels, latent_size
        self.attribute_names = list(attribute_names)
        a = len(self.attribute_names)
        base = base_kind(kind)
        self.encoder = Encoder(image_size, channels, latent_size, fc_width, a, width) if base != "gan" else None
        self.decoder = Decoder(image_size, channels, latent_size, a, width, up_conv)
        self.discriminator = Discriminator(image_size, channels, a, width) if base != "vae" else None
        init_weights(self)

    def networks(self):
        """{name: module} of the networks this kind has, each with its own optimizer."""
        names = ("encoder", "decoder", "discriminator")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def check_attributes(self, y, n):
        """y for n images: None for an unconditional model, (n, A) (or one (A,) row for all) otherwise."""
        if not self.conditional:
            if y is not None:
                raise ValueError(f"a {self.kind!r} model is not conditional: it takes no attributes")
            return None
        if y is None:
            raise ValueError(f"a {self.kind!r} model is conditional: pass attributes, (N, {len(self.attribute_names)}) "
                             f"values of +-1 for {', '.join(self.attribute_names)}")
        y = torch.as_tensor(y, dtype=torch.float32)
        if y.dim() == 1:
            y = y.expand(n, -1)
        if y.shape != (n, len(self.attribute_names)):
            raise ValueError(f"attributes of shape {tuple(y.shape)} given for {n} images; the model takes "
                             f"({n}, {len(self.attribute_names)}): {', '.join(self.attribute_names)}")
        device = next(self.parameters()).device
        return y.to(device, next(self.parameters()).dtype)

    @contextmanager
    def batch_statistics(self):
        """No-grad inference that normalises with each batch's own statistics, as training does,
        leaving the running statistics untouched. Early in training (and for GANs generally) the
        running statistics can lag far behind the weights; batch statistics then show what the
        networks have learnt."""
        saved = {name: b.clone() for name, b in self.named_buffers()}
        was_training = self.training
        self.train()
        try:
            with torch.no_grad():
                yield self
        finally:
            for name, b in self.named_buffers():
                b.copy_(saved[name])
            self.train(was_training)

    # The inference API (vaegan.load returns this model in eval mode: running statistics).
    # `attributes`: required by the conditional kinds, refused by the others.
    @torch.no_grad()
    def encode(self, x, attributes=None):
        """Images in [-1, 1], (N, C, H, W) -> (mu, logvar)."""
        if self.encoder is None:
            raise RuntimeError(f"a {self.kind!r} model has no encoder: it cannot encode or reconstruct")
        return self.encoder(x, self.check_attributes(attributes, x.shape[0]))

    @torch.no_grad()
    def decode(self, z, attributes=None):
        """Codes (N, latent_size) -> images in [-1, 1]."""
        return self.decoder(z, self.check_attributes(attributes, z.shape[0]))

    @torch.no_grad()
    def reconstruct(self, x, attributes=None):
        """Dec(mu(x)): the reconstruction from the posterior mean."""
        mu, _ = self.encode(x, attributes)
        return self.decode(mu, attributes)

    @torch.no_grad()
    def sample(self, n, seed=None, attributes=None):
        """n images decoded from z ~ N(0, I) (with the given attributes: conditional generation);
        the same seed gives the same images."""
        device = next(self.parameters()).device
        generator = torch.Generator(device="cpu")
        generator.manual_seed(torch.seed() if seed is None else seed)
        z = torch.randn(n, self.latent_size, generator=generator).to(device, next(self.parameters()).dtype)
        return self.decode(z, attributes)
