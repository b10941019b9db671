"""The reference maths of the fused ops, in plain PyTorch: the losses of the paper's section 2, per
sample, and each op's reference (what the kernels in this package are tested against, and what the
"torch" op set runs). Nothing here needs Triton.

Each loss returns one value per sample (shape (N,)), summed over features; the training step takes
the batch mean. Sign convention: L_GAN = log Dis(x) + log(1 - Dis(x_p)) is what the discriminator
*maximises*; the functions below return the quantities that are *minimised*, the log-losses. The
decoder's minimax term is the discriminator's loss negated (the authors' code reverses the
discriminator's gradient); its non-saturating alternative is the real log-loss on fakes, -log Dis(x_p).
Low-precision inputs are computed in float32 (float64 stays float64).
"""
import torch
import torch.nn.functional as F

from . import philox

AUTHORS_LOG_EPS = 1e-3  # the authors' code takes log(p + 1e-3)


def at_least_fp32(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kl_divergence(mu, logvar):
    """KL(q(z|x) || N(0, I)) = -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def feature_nll(features_fake, features_real):
    """L_llike^{Dis_l}: 1/2 ||Dis_l(x~) - Dis_l(x)||^2 summed over all feature dimensions.

    The Gaussian's constant D/2 log(2 pi) is left out: it does not affect gradients.
    """
    diff = (features_fake - features_real).flatten(1)
    return 0.5 * diff.pow(2).sum(dim=1)


def pixel_nll(x_rec, x):
    """The plain VAE's reconstruction term: the same Gaussian, in pixel space."""
    return feature_nll(x_rec, x)


def real_log_loss(logits_real):
    """-log Dis(x), from logits (numerically stable)."""
    return F.softplus(-logits_real)


def fake_log_loss(logits_fake):
    """-log(1 - Dis(x_p)), from logits (numerically stable)."""
    return F.softplus(logits_fake)


def real_log_loss_eps(logits_real):
    """-log(Dis(x) + 1e-3): the authors' form."""
    return -torch.log(torch.sigmoid(logits_real) + AUTHORS_LOG_EPS)


def fake_log_loss_eps(logits_fake):
    """-log(1 - Dis(x_p) + 1e-3): the authors' form."""
    return -torch.log(1 - torch.sigmoid(logits_fake) + AUTHORS_LOG_EPS)


GAN_LOSS_FORMS = {"logits": (real_log_loss, fake_log_loss), "eps": (real_log_loss_eps, fake_log_loss_eps)}


def equilibrium_costs(logits_real, logits_fake):
    """(real, fake): the batch means of the authors' log-losses that the equilibrium rule reads."""
    return real_log_loss_eps(logits_real).mean(), fake_log_loss_eps(logits_fake).mean()


# --- the ops' references (the fused ops in reparam.py, likelihood.py and gan.py compute the same) ---

def reparam_kl_reference(mu, logvar, seed, row_offset=0):
    """(z, kl per sample): z = mu + exp(logvar/2) * eps with eps Philox noise at (seed, (row_offset + row)
    * D + column), the noise the fused op draws."""
    eps = philox.rows_randn(seed, mu.shape[0], mu.shape[1], row_offset, device=mu.device)
    mu, logvar = at_least_fp32(mu), at_least_fp32(logvar)
    return mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype), kl_divergence(mu, logvar)


def feature_nll_reference(features_fake, features_real):
    """1/2 ||fake - real||^2 per sample, the real features a constant target."""
    return feature_nll(at_least_fp32(features_fake), at_least_fp32(features_real.detach()))


def gan_loss_reference(logits_real, logits_fake, real_weight=0.5, fake_weight=0.5, form="logits"):
    """(dis_loss, gen_loss, real_cost, fake_cost): the discriminator's weighted log-loss, the
    non-saturating decoder term fake_weight * mean(-log Dis(fake)), and the equilibrium costs."""
    real, fake = at_least_fp32(logits_real).reshape(-1), at_least_fp32(logits_fake).reshape(-1)
    real_loss, fake_loss = GAN_LOSS_FORMS[form]
    dis_loss = real_weight * real_loss(real).mean() + fake_weight * fake_loss(fake).mean()
    gen_loss = fake_weight * real_loss(fake).mean()
    real_cost, fake_cost = equilibrium_costs(real.detach(), fake.detach())
    return dis_loss, gen_loss, real_cost, fake_cost


def masked_rmsprop_reference_(param, grad, square_avg, update, lr, weight_decay=0.0, alpha=0.9, eps=1e-8):
    """The masked_rmsprop_ op's step (kernels/rmsprop.py): torch's RMSprop formula, param and square_avg
    updated in place where `update` (a 0-d bool tensor) is True, left as they were where it is False."""
    g = grad + weight_decay * param if weight_decay != 0 else grad
    new_square_avg = alpha * square_avg + (1 - alpha) * g * g
    new_param = param - lr * g / (new_square_avg.sqrt() + eps)
    square_avg.copy_(torch.where(update, new_square_avg, square_avg))
    param.copy_(torch.where(update, new_param, param))


def bn_relu_conv_reference(x, scale, shift, weight, bias=None, stride=1, padding=0, with_sums=True):
    """The bn_relu_conv op (kernels/fused_conv.py) unfused: (y, channel_sum, channel_sumsq) of
    y = conv2d(relu(x * scale + shift), weight, bias), the activation rounded to the weight's dtype as the
    kernel rounds its operands, the sums in float32."""
    affine = (1, -1, 1, 1)
    a = (at_least_fp32(x) * scale.view(affine) + shift.view(affine)).clamp_min(0).to(weight.dtype)
    y = F.conv2d(a, weight, None if bias is None else bias.to(weight.dtype), stride, padding)
    if not with_sums:
        return y, y.new_empty(0, dtype=torch.float32), y.new_empty(0, dtype=torch.float32)
    y32 = at_least_fp32(y)
    return y, y32.sum((0, 2, 3)), y32.pow(2).sum((0, 2, 3))
