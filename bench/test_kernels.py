"""Each fused op, forward + backward, against the eager composition of its reference.

Each is timed as the step benchmarks time a step: REPEATS calls between two CUDA events with nothing
synchronising in between, one synchronisation at the end (timing.StepClock; pytest-benchmark's
figure is the wall clock over the same stretch), after WARMUP calls. The time per call is then the
device's time for the op's kernels where the host queues them faster than the device runs them (a
synchronised call's latency would count a launch and a synchronisation too, and a bandwidth from it
would understate the kernel's).

Reported in extra_info and the rows file (timing.record): the eager time measured in the same run, the
speed-up (eager / fused), the bytes the fused op must move and the bandwidth it achieved (bytes over
the event-timed time per call), as a fraction of the device's HBM bandwidth where the device is known.
Targets: >= 3x at batch 256 for each op, >= 70% of HBM bandwidth for feature_nll at batch 1024.
"""
import pytest
import torch

import kernels
from timing import CUDA, DEVICE, StepClock, device_peak, event_seconds, record, sync
from kernels import reference as losses

BATCHES = [64, 256, 1024] if CUDA else [2]
LATENT = 128
FEATURES = (256, 8, 8) if CUDA else (16, 4, 4)  # Dis_l of the 64 px networks
DTYPE = torch.bfloat16 if CUDA else torch.float32
# Peak HBM bandwidth (bytes/s) of the devices we time on: H100 SXM 3.35 TB/s, H200 4.8 TB/s.
HBM = {"H100": 3.35e12, "H200": 4.8e12}


REPEATS, WARMUP = (200, 20) if CUDA else (2, 1)


def compare(benchmark, row, fused, eager, bytes_moved):
    eager_s = event_seconds(eager, REPEATS, WARMUP)
    for _ in range(WARMUP):
        fused()
    sync()
    clock = StepClock(fused, REPEATS)
    benchmark.pedantic(clock, rounds=1, iterations=REPEATS)
    fused_s = clock.seconds_per_step
    achieved = bytes_moved / fused_s
    bandwidth = device_peak(HBM)
    record(row, {"eager_s_per_call": eager_s, "fused_s_per_call": fused_s, "speedup_vs_eager": eager_s / fused_s,
                 "bytes_moved": bytes_moved, "achieved_GBps": achieved / 1e9,
                 "fraction_of_hbm": achieved / bandwidth if bandwidth else None,
                 "timed_by": "cuda events" if CUDA else "wall clock"}, benchmark)
    assert eager_s > 0 and fused_s > 0


def random(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=True)


def reparam_kl_eager(mu, logvar, seed):
    """What the eager step does without the kernel: torch.randn noise, then the reference KL."""
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    return z, losses.kl_divergence(mu.float(), logvar.float())


@pytest.mark.parametrize("batch", BATCHES)
def test_reparam_kl(benchmark, batch):
    mu, logvar = random(batch, LATENT), random(batch, LATENT)
    grad_z = torch.randn(batch, LATENT, device=DEVICE, dtype=DTYPE)

    def run(op):
        def step():
            z, kl = op(mu, logvar, 1234)
            torch.autograd.backward([z, kl], [grad_z, torch.ones_like(kl)])
        return step
    element = DTYPE.itemsize
    # forward: read mu, logvar, write z; backward: read mu, logvar, grad_z, write two gradients
    compare(benchmark, f"reparam_kl-{batch}", run(kernels.reparam_kl), run(reparam_kl_eager),
            8 * batch * LATENT * element)


@pytest.mark.parametrize("batch", BATCHES)
def test_feature_nll(benchmark, batch):
    fake, real = random(batch, *FEATURES), random(batch, *FEATURES).detach()
    grad = torch.ones(batch, device=DEVICE)

    def run(op):
        return lambda: op(fake, real).backward(grad)
    numel = fake.numel()
    # forward: read fake and real; backward: read fake and real, write the gradient
    compare(benchmark, f"feature_nll-{batch}", run(kernels.feature_nll), run(kernels.feature_nll_reference),
            5 * numel * DTYPE.itemsize)


@pytest.mark.parametrize("batch", BATCHES)
def test_gan_loss(benchmark, batch):
    real, fake = random(batch), random(batch)

    def run(op):
        def step():
            dis_loss, gen_loss, _, _ = op(real, fake, 0.5, 0.5)
            (dis_loss + gen_loss).backward()
        return step
    compare(benchmark, f"gan_loss-{batch}", run(kernels.gan_loss), run(kernels.gan_loss_reference), 4 * batch * DTYPE.itemsize)
