"""The baseline of the step benchmark: the VAE/GAN step the way common ports write it.

Eager fp32, contiguous; separate discriminator forwards for the reconstructions, the real images
and the prior samples; three backward passes over one graph with `retain_graph`, all gradients
taken before any optimizer steps; for-loop RMSprop. The math differs from the authors' in one way
common ports share: BatchNorm normalises each separate forward with its own statistics.
"""
import torch

from kernels import reference as losses


def baseline_step(model, x, z_prior, optimizers, gamma):
    enc, dec, dis = model.encoder, model.decoder, model.discriminator
    mu, logvar = enc(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    x_rec = dec(z)
    x_p = dec(z_prior)
    kl = losses.kl_divergence(mu, logvar).mean()
    llike = losses.feature_nll(dis(x_rec, features_only=True), dis(x, features_only=True).detach()).mean()
    logits_real, logits_fake = dis(x), dis(x_p)
    dis_loss = 0.5 * (losses.real_log_loss(logits_real).mean() + losses.fake_log_loss(logits_fake).mean())
    own = {"encoder": kl + llike, "decoder": gamma * llike - dis_loss, "discriminator": dis_loss}
    grads = {}
    for i, (name, loss) in enumerate(own.items()):
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward(retain_graph=i < 2)
        grads[name] = [p.grad for p in getattr(model, name).parameters()]
    for name, opt in optimizers.items():
        for p, g in zip(getattr(model, name).parameters(), grads[name]):
            p.grad = g
        opt.step()
    return dis_loss.detach()
