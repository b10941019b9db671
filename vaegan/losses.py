"""The reference losses, per sample, in plain PyTorch (the paper's section 2).

Each returns one value per sample (shape (N,)), summed over features; the training step
takes the batch mean. These are the specification the fused kernels are tested against.

Sign convention: L_GAN = log Dis(x) + log(1 - Dis(x_p)) is what the discriminator
*maximises*; the functions below return the quantities that are *minimised*, i.e. the
log-losses (cross-entropies). The decoder's minimax term is the discriminator's loss negated
(the authors' code reverses the discriminator's gradient); its non-saturating alternative is
the real log-loss applied to fakes, -log Dis(x_p).
"""
import torch
import torch.nn.functional as F

AUTHORS_LOG_EPS = 1e-3  # the authors' code takes log(p + 1e-3)


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
