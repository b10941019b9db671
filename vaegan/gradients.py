"""Who learns from what: the split update of the VAE/GAN (the paper's Algorithm 1; the authors' `model/aegan.py`).

    encoder       descends  KL + L_llike
    decoder       descends  gamma * L_llike + (1 - gamma) * L_gen   (L_gen: minimax or non-saturating)
    discriminator descends  L_dis = -L_GAN              (never any gradient of L_llike)

L_dis weights reals and fakes (0.5/0.5); L_gen does not: in the authors' code the gradient is
scaled by each sample's weight w entering the discriminator's loss and by 1/w leaving its input,
so the decoder's term is the unweighted cross-entropy, sum over the batch's reals and fakes
divided by the batch size (`model/aegan.py`: WeightedParameter, ScaleGradient). Minimax: L_gen =
-(L_dis with the weights undone); non-saturating: L_gen = sum over fakes of -log Dis(fake), divided by the batch size.

`compute_gradients` gets all three from one forward and ONE backward pass, by routing:
  * Dis_l for L_llike is evaluated with the discriminator's parameters detached, so the
    discriminator receives nothing of L_llike while the gradient still reaches x~;
  * the gradient of L_llike entering x~ is scaled by gamma (the decoder's weight) and the
    gradient leaving the decoder at z is scaled by 1/gamma (the encoder's weight is 1);
  * the minimax decoder term is the discriminator's loss with its gradient reversed at x_p;
    the non-saturating term is read off a second discriminator pass with detached parameters.
`compute_gradients_reference` takes the same gradients the slow, obvious way (one loss per
network, three gradient computations): the tests hold the fast path to it.
Both leave every gradient in `.grad` and step no optimizer: all gradients of a step come from
the parameters as they were at its start. The routed losses come from the op set the config
names, chosen once (kernels.op_set): the references in kernels/reference.py ("torch") or the
fused kernels ("triton"): the same values, the same noise. Which optimizers then step is
vaegan/decisions.py; the step as a whole, vaegan/train_step.py.
"""
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

import kernels
from kernels import reference as losses

# What every step reports (0-d tensors, detached), in the order metrics.jsonl lists them; the kinds
# without an encoder or a discriminator leave theirs out.
STEP_STATS = ("kl", "llike", "dis_loss", "gen_loss", "real_cost", "fake_cost", "pixel_error")


@dataclass
class UpdateConfig:
    kind: str = "vaegan"
    gamma: float = 1e-6
    real_weight: float = 0.5
    fake_weight: float = 0.5
    saturating: bool = True        # the authors' minimax decoder term
    gan_loss_form: str = "logits"  # "logits" (stable) or "eps" (the authors' log(p + 1e-3))
    dis_sees_recon: bool = False   # the paper's Algorithm 1: x~ is a fake for the discriminator
    equilibrium: bool = True
    equilibrium_value: float = 0.68
    margin: float = 0.35
    kernels: str = "torch"         # "torch" (reference losses) or "triton" (the fused kernels)
    decoder_call: str = "separate"  # "joint": Dec on z and on z_p in one call (models.Decoder.forward_joint)
    ops: object = field(default=None, init=False, repr=False, compare=False)  # kernels.op_set(kernels)

    def __post_init__(self):
        if self.decoder_call not in ("separate", "joint"):
            raise ValueError(f"decoder_call {self.decoder_call!r} is not 'separate' or 'joint'")
        self.ops = kernels.op_set(self.kernels, self.gan_loss_form)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x, scale):
    """Identity forward; multiplies the gradient by `scale` on the way back."""
    return x if scale == 1 else _ScaleGrad.apply(x, scale)


def extra_pass(module, *args, detach=False, **kwargs):
    """Call `module` leaving its BatchNorm running statistics as they were (they are updated on
    copies, thrown away). The authors keep a separate copy of a network for each extra use (the
    decoder on prior samples, the discriminator for Dis_l), so the statistics the test-time model
    uses come from one pass: the decoder's from the reconstructions, the discriminator's from the
    GAN pass. detach: the parameters are detached too (gradients reach the inputs, not the weights)."""
    params = {name: p.detach() if detach else p for name, p in module.named_parameters()}
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    return torch.func.functional_call(module, {**params, **buffers}, args, kwargs)


def frozen(module, *args, **kwargs):
    """An extra pass with the parameters detached: gradients reach the inputs, not the weights."""
    return extra_pass(module, *args, detach=True, **kwargs)


def decoder_llike_weight(cfg):
    # gamma trades L_llike against the GAN term; with no GAN term (vae-disl) the decoder takes L_llike whole.
    return cfg.gamma if cfg.kind == "vaegan" else 1.0


def decoder_gan_scale(cfg, batch, fakes):
    """What multiplies dL_dis/d(fakes) for the decoder: (1 - gamma) for the VAE/GAN (1 for a GAN),
    over the weight L_dis gives each fake (fake_weight * batch / fakes, as the authors' code has it),
    which undoes that weight."""
    gan_weight = 1.0 - cfg.gamma if cfg.kind == "vaegan" else 1.0
    return gan_weight * fakes / (cfg.fake_weight * batch)


def joint_decoder(cfg, model):
    """Whether the decoder's two passes (reconstructions, prior samples) are one call: asked for, and
    both passes exist with gradients (vaegan)."""
    return cfg.decoder_call == "joint" and cfg.kind == "vaegan" and model.encoder is not None \
        and model.discriminator is not None


def _autocast(x, dtype):
    """Autocast without its cache of low-precision weight copies: with the cache, a weight used by two
    passes (the decoder on z and on z_p) has ONE bf16 copy, so the passes' weight gradients are summed
    in bf16 before the cast back to fp32, and the decoder's gamma * L_llike gradient (1e-4 of its GAN
    gradient at gamma 1e-6) rounds away. Uncached, each pass casts its own copy and its gradient
    returns to fp32 before the sum. (Compiled graphs are traced with the cache off already.)"""
    if dtype is None:
        return nullcontext()
    return torch.autocast(x.device.type, dtype=dtype, cache_enabled=False)


def _split(t, n):
    return t[:n], t[n:]


def _cat(*tensors):
    """torch.cat along the batch, or None for an unconditional model's missing attributes."""
    return None if tensors[0] is None else torch.cat(tensors)


def discriminator_loss(cfg, logits_real, logits_fake):
    """L_dis = -L_GAN: weighted batch means of -log Dis(x) and -log(1 - Dis(fake))."""
    real_loss, fake_loss = losses.GAN_LOSS_FORMS[cfg.gan_loss_form]
    return cfg.real_weight * real_loss(logits_real).mean() + cfg.fake_weight * fake_loss(logits_fake).mean()


def non_saturating_generator_loss(cfg, logits_fake):
    """The decoder's alternative to the minimax term: fake_weight * -log Dis(x_p)."""
    real_loss = losses.GAN_LOSS_FORMS[cfg.gan_loss_form][0]
    return cfg.fake_weight * real_loss(logits_fake).mean()


def pixel_mse(x_rec, x):
    """Mean squared pixel error of the reconstructions: a diagnostic, no network descends it here."""
    return (x_rec.detach().float() - x.float()).pow(2).mean()


def _stats(**tensors):
    assert tuple(tensors) == STEP_STATS
    return {name: t.detach() for name, t in tensors.items() if t is not None}


def _reparameterise(cfg, mu, logvar, noise_seed, row_offset):
    """(z, batch-mean KL); eps is Philox noise at (noise_seed, (row_offset + row) * D + column)."""
    z, kl = cfg.ops.reparam_kl(mu, logvar, noise_seed, row_offset)
    return z, kl.mean()


def compute_gradients(model, x, z_prior, cfg, noise_seed, row_offset=0, autocast_dtype=None, attributes=None):
    """One forward, one backward: afterwards each network's `.grad` is the gradient of its own loss.

    x: images (B, C, H, W) in [-1, 1]; z_prior: (B, latent) prior codes; attributes: (B, A) for a
    conditional model (the prior samples take the batch's own attributes), else None; the reparameterisation
    noise is Philox at noise_seed (an int or a one-element tensor), rows offset by row_offset (a rank's
    place in the global batch). Returns the step's losses and the equilibrium costs, detached (no
    device synchronisation here).
    """
    for p in model.parameters():
        p.grad = None
    total, stats = routed_losses(model, x, z_prior, cfg, noise_seed, row_offset, autocast_dtype, attributes)
    total.backward()
    return stats


def routed_losses(model, x, z_prior, cfg, noise_seed, row_offset=0, autocast_dtype=None, attributes=None):
    """The forward half of `compute_gradients`: (the routed total whose one backward pass gives every
    network its own gradient, the detached stats). torch.compile compiles this (vaegan/train_step.py)."""
    enc, dec, dis = model.encoder, model.decoder, model.discriminator
    batch, y = x.shape[0], attributes
    kl = llike = dis_loss = gen_loss = real_cost = fake_cost = pixel_error = None
    with _autocast(x, autocast_dtype):
        if enc is not None:
            mu, logvar = enc(x, y)
            z, kl = _reparameterise(cfg, mu, logvar, noise_seed, row_offset)
            w = decoder_llike_weight(cfg)
            if joint_decoder(cfg, model):  # the prior samples' pass is the second half of the same call
                x_rec, fakes = dec.forward_joint(scale_grad(z, 1.0 / w), z_prior, y)
            else:
                x_rec = dec(scale_grad(z, 1.0 / w), y)  # the encoder receives dL_llike/dz at weight 1 ...
            x_rec_llike = scale_grad(x_rec, w)    # ... and the decoder at weight w
            pixel_error = pixel_mse(x_rec, x)
        if dis is not None:
            y_fakes = y
            # the decoder's statistics are its reconstructions' (a GAN has no other pass)
            prior_pass = dec if enc is None else (lambda *a: extra_pass(dec, *a))
            if cfg.kind == "vae-disl":  # the decoder gets no GAN gradient
                with torch.no_grad():
                    fakes = prior_pass(z_prior, y)
            else:
                if not joint_decoder(cfg, model):
                    fakes = prior_pass(z_prior, y)
                if cfg.dis_sees_recon:  # a separate decoder pass from z.detach(): no GAN gradient reaches the encoder
                    fakes, y_fakes = torch.cat([fakes, extra_pass(dec, z.detach(), y)]), _cat(y, y)
            minimax = cfg.kind != "vae-disl" and cfg.saturating
            gan_scale = decoder_gan_scale(cfg, batch, fakes.shape[0])
            # minimax: the decoder descends -L_dis (weights undone), the discriminator's gradient reversed at the fakes
            fakes_for_dis = scale_grad(fakes, -gan_scale) if minimax else fakes.detach()
            # the real images' per-image layers, with the live weights; the frozen passes reuse them detached
            # (they only need their values: the real half of a frozen pass sends no gradient anywhere)
            per_image = dis(torch.cat([x, fakes_for_dis]), _cat(y, y_fakes), per_image_only=True)
            real_per_image = per_image[:batch].detach()
        total = 0.0
        if enc is not None:
            if dis is None:  # plain VAE: the Gaussian in pixel space
                llike = cfg.ops.feature_nll(x_rec_llike, x).mean()
            else:
                rec_per_image = frozen(dis, x_rec_llike, y, per_image_only=True)
                features_rec, features_real = _split(frozen(dis, torch.cat([rec_per_image, real_per_image]),
                                                            features_only=True, from_per_image=True), batch)
                llike = cfg.ops.feature_nll(features_rec, features_real.detach()).mean()
            total = kl + llike
        if dis is not None:
            logits_real, logits_fake = _split(dis(per_image, from_per_image=True), batch)
            dis_loss, _, real_cost, fake_cost = cfg.ops.gan_loss(logits_real, logits_fake, cfg.real_weight,
                                                                 cfg.fake_weight)
            total = total + dis_loss
            if cfg.kind != "vae-disl":
                if minimax:
                    gen_loss = -gan_scale * dis_loss  # reported; its gradient is already routed
                else:
                    fake_per_image = frozen(dis, fakes, y_fakes, per_image_only=True)
                    frozen_real, frozen_fake = _split(frozen(dis, torch.cat([real_per_image, fake_per_image]),
                                                             from_per_image=True), batch)
                    gen_loss = gan_scale * cfg.ops.gan_loss(frozen_real.detach(), frozen_fake, cfg.real_weight,
                                                            cfg.fake_weight)[1]
                    total = total + gen_loss
    return total, _stats(kl=kl, llike=llike, dis_loss=dis_loss, gen_loss=gen_loss, real_cost=real_cost,
                         fake_cost=fake_cost, pixel_error=pixel_error)


def network_losses(model, x, eps, z_prior, cfg, attributes=None):
    """The three networks' losses written out plainly, from one ordinary forward pass.

    Returns ({network name: its loss}, stats). The reference for the routed step.
    """
    enc, dec, dis = model.encoder, model.decoder, model.discriminator
    batch, y = x.shape[0], attributes
    own = {}
    kl = llike = dis_loss = gen_loss = real_cost = fake_cost = pixel_error = None
    if enc is not None:
        mu, logvar = enc(x, y)
        z = mu + torch.exp(0.5 * logvar) * eps
        x_rec = dec(z, y)
        pixel_error = pixel_mse(x_rec, x)
        kl = losses.kl_divergence(mu, logvar).mean()
        if dis is None:
            llike = losses.pixel_nll(x_rec, x).mean()
        else:
            features_rec, features_real = _split(dis(torch.cat([x_rec, x]), _cat(y, y), features_only=True), batch)
            llike = losses.feature_nll(features_rec, features_real.detach()).mean()
        own["encoder"] = kl + llike
        own["decoder"] = decoder_llike_weight(cfg) * llike
    if dis is not None:
        x_prior = dec(z_prior, y)
        fakes, y_fakes = x_prior, y
        if cfg.dis_sees_recon and cfg.kind != "vae-disl":
            fakes, y_fakes = torch.cat([x_prior, x_rec]), _cat(y, y)
        if cfg.kind == "vae-disl":
            fakes = fakes.detach()
        logits_real, logits_fake = _split(dis(torch.cat([x, fakes]), _cat(y, y_fakes)), batch)
        dis_loss = discriminator_loss(cfg, logits_real, logits_fake)
        own["discriminator"] = dis_loss
        if cfg.kind != "vae-disl":
            # Minimax: the decoder descends all of -L_dis, its weights undone. With BatchNorm over
            # concat[x, fakes], even log Dis(x) depends on the fakes through the batch statistics:
            # the authors' gradient reversal includes that, and so does this.
            gan_scale = decoder_gan_scale(cfg, batch, fakes.shape[0])
            gen_loss = gan_scale * (-dis_loss if cfg.saturating else non_saturating_generator_loss(cfg, logits_fake))
            own["decoder"] = own.get("decoder", 0.0) + gen_loss
        real_cost, fake_cost = losses.equilibrium_costs(logits_real.detach(), logits_fake.detach())
    return own, _stats(kl=kl, llike=llike, dis_loss=dis_loss, gen_loss=gen_loss, real_cost=real_cost,
                       fake_cost=fake_cost, pixel_error=pixel_error)


def compute_gradients_reference(model, x, eps, z_prior, cfg, attributes=None):
    """Each network's gradient of its own loss, one autograd.grad per network (slow, obvious)."""
    own, stats = network_losses(model, x, eps, z_prior, cfg, attributes)
    nets = model.networks()
    for i, (name, loss) in enumerate(own.items()):
        params = list(nets[name].parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=i < len(own) - 1, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
    return stats
