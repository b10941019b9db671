"""The steps the step benchmark (bench/test_step.py) and the profile (bench/profile_step.py) compare.

`port`: the VAE/GAN step the way common ports write it (`baseline_step`). Eager fp32, contiguous;
separate discriminator forwards for the reconstructions, the real images and the prior samples;
three backward passes over one graph with `retain_graph`, all gradients taken before any optimizer
steps; for-loop RMSprop. The math differs from the authors' in one way common ports share:
BatchNorm normalises each separate forward with its own statistics. So it is not the function our
step computes, and a speed-up against it mixes a different algorithm with a faster implementation.

`fair`: our routed update (one forward, one routed backward, three masked optimizer steps) as a
careful eager implementation would run it: bf16 autocast, channels-last, foreach RMSprop, the
reference losses (kernels "torch"), no compile, no CUDA graphs; `cudnn.benchmark` as in every mode.
On a CPU it is bf16 where the CPU has bf16 instructions, fp32 where bf16 would be emulated (slower).

`eager`: our eager step as it was benchmarked before: fp32, contiguous, the fused Triton losses
(reference losses on a CPU).

`fastest`: bf16, torch.compile (inductor) with CUDA graphs, the fused Triton losses, channels-last.
On a CPU: bf16 or fp32 as for `fair`, compiled with the "aot_eager" backend, no graphs, the
reference losses (the Triton interpreter would time Python). Its RMSprop is foreach, or
VAEGAN_BENCH_OPTIMIZER_IMPL's (fused: the masked RMSprop kernel; bench/run_gpu.sh optimizer64).
"""
import os

import torch

from kernels import reference as losses
from timing import CUDA, DEVICE
from vaegan import options, trainer
from vaegan.config import TrainConfig
from vaegan.models import VAEGAN
from vaegan.optimizers import make_optimizer

# The paper's networks at 64 px on a GPU; on a CPU a tiny configuration, only to show the code runs.
SIZE, CHANNELS = (64, 3) if CUDA else (32, 1)
LATENT, FC = (128, 1024) if CUDA else (16, 64)
WIDTH = 1.0  # the paper's channel widths; the CPU smoke tests narrow them (build's `width`)
GAMMA = 1e-6
FASTEST_OPTIMIZER_IMPL = os.environ.get("VAEGAN_BENCH_OPTIMIZER_IMPL", "foreach")

MODES = ("port", "fair", "eager", "fastest")
DESCRIPTIONS = {
    "port": "port-style: eager fp32, contiguous, separate forwards, 3 backwards with retain_graph, for-loop RMSprop",
    "fair": "routed update, eager bf16, channels-last, foreach RMSprop, reference losses",
    "eager": "routed update, eager fp32, contiguous, foreach RMSprop, fused Triton losses",
    "fastest": "routed update, bf16, torch.compile + CUDA graphs, fused Triton losses, channels-last",
}


def low_precision():
    """bf16 on CUDA and on CPUs with bf16 instructions; fp32 on a CPU that would emulate bf16."""
    return "bf16" if CUDA or options.cpu_has_native_bf16() else "fp32"


def step_config(mode, batch, kernels=None, width=WIDTH):
    """The resolved TrainConfig of one of our modes ("fair", "eager", "fastest") at `batch`; `kernels`
    ("torch" | "triton") overrides the mode's losses (the profile compares the two); `width`: the
    networks' channel-width multiplier."""
    settings = {
        "fair": dict(precision=low_precision(), memory_format="channels-last", compile=False, cuda_graphs=False,
                     kernels="torch"),
        "eager": dict(precision="fp32", memory_format="contiguous", compile=False, cuda_graphs=False,
                      kernels="triton" if CUDA else "torch"),
        "fastest": dict(precision=low_precision(), memory_format="channels-last", compile=True, cuda_graphs=CUDA,
                        kernels="triton" if CUDA else "torch"),
    }[mode]
    if kernels is not None:
        settings["kernels"] = kernels
    cfg = TrainConfig(data="generated", image_size=SIZE, channels=CHANNELS, latent_size=LATENT, fc_width=FC,
                      width=width, batch_size=batch, steps=1, gamma=GAMMA, lr_schedule="constant", augment="none",
                      device=DEVICE, out="unused", compile_backend="inductor" if CUDA else "aot_eager",
                      optimizer_impl=FASTEST_OPTIMIZER_IMPL if mode == "fastest" else "foreach",
                      **settings)
    cfg, _ = options.resolve(cfg, torch.device(DEVICE))
    return cfg


def random_images(batch):
    return torch.rand(batch, CHANNELS, SIZE, SIZE, device=DEVICE) * 2 - 1  # random images: never zeros


def build(mode, batch, kernels=None, width=WIDTH):
    """(one training step as a function of nothing, the model, {what the mode is}). `cudnn.benchmark`
    is on in every mode. Our modes are the trainer's own step (trainer.build_step, options resolved
    by options.resolve) on one batch of random images, run as the training loop runs it: noise,
    decisions and masked updates on the device, nothing waiting for it."""
    torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once, as the trainer does
    torch.manual_seed(0)
    if mode == "port":
        if kernels not in (None, "torch"):
            raise ValueError("the port-style step has the reference losses only")
        model = VAEGAN("vaegan", SIZE, CHANNELS, latent_size=LATENT, fc_width=FC, width=width).to(DEVICE)
        x = random_images(batch)
        z_prior = torch.randn(batch, model.latent_size, device=DEVICE)
        optimizers = {n: make_optimizer("rmsprop", "for-loop", list(net.parameters()), 3e-4, tensor_lr=False)
                      for n, net in model.networks().items()}

        def step():
            baseline_step(model, x, z_prior, optimizers, GAMMA)
        return step, model, {"mode": mode, "description": DESCRIPTIONS[mode], "precision": "fp32",
                             "memory_format": "contiguous", "kernels": "torch", "compile": False, "cuda_graphs": False,
                             "optimizer_impl": "for-loop", "width": width}
    if mode == "fastest":
        torch._dynamo.reset()  # each case compiles afresh: no earlier case's graphs count against the recompile limit
    cfg = step_config(mode, batch, kernels, width)
    model, _, train_step = trainer.build_step(cfg, torch.device(DEVICE))
    x = random_images(batch)
    steps = iter(range(10 ** 9))

    def step():
        train_step(x, None, next(steps))
    return step, model, {"mode": mode, "description": DESCRIPTIONS[mode], "precision": cfg.precision,
                         "memory_format": cfg.memory_format, "kernels": cfg.kernels, "compile": cfg.compile,
                         "cuda_graphs": cfg.cuda_graphs, "compile_backend": cfg.compile_backend if cfg.compile else None,
                         "optimizer_impl": cfg.optimizer_impl, "width": cfg.width}


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
