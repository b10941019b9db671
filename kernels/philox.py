"""Triton's normal stream, `tl.randn(seed, offset)`, in plain PyTorch.

tl.randn draws from Philox-4x32 with 10 rounds (counter = (offset, 0, 0, 0), key = the seed)
and turns the first two words into one normal by Box-Muller. Computing the same numbers here
lets the torch path of the training step use exactly the noise that the fused kernel draws
in-kernel (so `--kernels torch` and `--kernels triton` follow the same trajectory), and lets
the tests check the kernel's noise against an independent implementation.
"""
import math

import torch

MASK32 = 0xFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # largest scale with (2**31 - 1) * scale < 1 in float32
SEED_LIMIT = 2 ** 31


def normalise_seed(seed):
    """Seeds are taken modulo 2**31: an int, or an integer tensor (kept on its device: no sync)."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(()).to(torch.int64) % SEED_LIMIT
    return int(seed) % SEED_LIMIT


def seed_tensor(seed, device):
    """The seed as the kernels read it: a one-element int64 tensor on `device`."""
    if isinstance(seed, torch.Tensor):
        return normalise_seed(seed).to(device).reshape(1)
    return torch.tensor([normalise_seed(seed)], dtype=torch.int64, device=device)


def _mul_hi_lo(a, b):
    """(hi, lo) 32-bit words of a * b for a < 2**32 (int) and b a tensor of uint32 values in int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo, p_hi = a * b_lo, a * b_hi  # each < 2**48: no int64 overflow
    middle = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (middle >> 32), middle & MASK32


def philox_words(seed, offsets):
    """The first two 32-bit words of Philox-4x32-10 at counters (offsets, 0, 0, 0), key (seed, 0)."""
    c0 = offsets.to(torch.int64) & MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = normalise_seed(seed) & MASK32, 0
    for _ in range(ROUNDS):
        hi_b, lo_b = _mul_hi_lo(ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1


def _uniform(words):
    signed = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * UNIFORM_SCALE  # a Python scalar, not a CPU tensor: compiled graphs stay on the device


def randn(seed, offsets):
    """float32 normals equal (to float rounding of log/cos) to tl.randn(seed, offsets)."""
    w1, w2 = philox_words(seed, offsets)
    u1 = torch.clamp(_uniform(w1), min=1.0e-7)
    theta = (2 * math.pi) * _uniform(w2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def rows_randn(seed, rows, columns, row_offset=0, device="cpu"):
    """The (rows, columns) noise the reparameterisation kernel draws: element (r, c) has offset
    (row_offset + r) * columns + c, so a rank holding rows row_offset.. of a global batch draws
    its slice of the global batch's noise."""
    r = torch.arange(rows, device=device, dtype=torch.int64).unsqueeze(1) + row_offset
    c = torch.arange(columns, device=device, dtype=torch.int64).unsqueeze(0)
    return randn(seed, r * columns + c)


def step_noise(run_seed, step, batch, columns, global_batch, row_offset=0):
    """(noise_seed, z_prior) of one training step, drawn on step's device without synchronising.

    step: a one-element int64 tensor. noise_seed = Philox(key run_seed, counter step): the key of
    the step's reparameterisation noise (rows 0 .. global_batch - 1 of its stream). The prior codes
    are rows global_batch + row_offset .. of the same stream: a rank's slice of the global batch's,
    the same whatever the number of processes."""
    noise_seed = philox_words(run_seed, step.reshape(1))[0] % SEED_LIMIT
    return noise_seed, rows_randn(noise_seed, batch, columns, global_batch + row_offset, device=step.device)
