"""What the step's levers save, counted on a CPU with torch's FlopCounterMode (no GPU needed): FLOPs
per 64 px image of the routed step (one forward, one routed backward) for the paper's networks,
and of the work each lever removes; and the bytes the optimizer steps move. `python
bench/lever_counts.py` prints a table.

Per-image discriminator layers computed once: the first convolution, its ReLU and the second
convolution see one image at a time, so the real images' outputs of those layers are taken once
(in the GAN pass, with the live weights) and reused by the frozen passes. Each frozen pass used to
run them forward on the real images and back to its input (the batch's input gradient is computed
for the whole concatenation): that is what is counted as saved, per frozen pass over real images
(one with the minimax decoder term, two with the non-saturating one).
"""
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vaegan.gradients import UpdateConfig, compute_gradients  # noqa: E402
from vaegan.models import VAEGAN  # noqa: E402

BATCH = 2  # FLOPs per image do not depend on it


def routed_flops(kind, saturating):
    torch.manual_seed(0)
    model = VAEGAN(kind, 64, 3)
    x, z_prior = torch.rand(BATCH, 3, 64, 64) * 2 - 1, torch.randn(BATCH, 128)
    with FlopCounterMode(display=False) as counter:
        compute_gradients(model, x, z_prior, UpdateConfig(kind=kind, saturating=saturating), 5)
    return counter.get_total_flops() / BATCH


def per_image_layers_flops():
    """Forward and input gradient of the per-image layers, for one real image in a frozen pass."""
    torch.manual_seed(0)
    dis = VAEGAN("vaegan", 64, 3).discriminator.requires_grad_(False)  # frozen: gradients to the input only
    x = (torch.rand(BATCH, 3, 64, 64) * 2 - 1).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        dis(x, per_image_only=True).sum().backward()
    return counter.get_total_flops() / BATCH


# Bytes moved per float32 parameter by one masked RMSprop step (counted from the code, not measured):
# today's masked_step clones each parameter and its square_avg (read + write each: 8 + 8), runs
# torch's step (reads p, g, square_avg; writes p, square_avg: 20) and keeps or restores both by a
# torch.where (reads new and old, writes: 12 + 12), whether the update is kept or not; the fused
# kernel reads p, g, square_avg and writes p, square_avg when kept (20), and reads only the flag when
# skipped (1 byte per program of 1024 elements). The compiled masked_step moves these 60 bytes too:
# inductor's code for it (on a CPU) is three graphs around optimizer.step, the clones, the step and
# the torch.where written in place, with no fusion across them. Left out: the 0-d terms (step
# counts: under 1 KB a network), the eager masked_step's copies of the torch.where results back
# into place (8 + 8 more) and the extra passes of torch's multi-pass eager RMSprop (20 is the least
# any step moves).
MASKED_STEP_BYTES = (8 + 8) + 20 + (12 + 12)
FUSED_KEPT_BYTES = 20
FUSED_SKIPPED_BYTES = 1 / 1024
BANDWIDTH = 4.8e12  # bytes/s: an H200's HBM3e, as its datasheet gives it


def optimizer_step_bytes():
    """{network: (fp32 parameters, bytes per step: masked_step, fused kept, fused skipped)} for the
    paper's 64 px VAE/GAN."""
    model = VAEGAN("vaegan", 64, 3)
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in model.networks().items()}
    return {name: (n, n * MASKED_STEP_BYTES, n * FUSED_KEPT_BYTES, n * FUSED_SKIPPED_BYTES)
            for name, n in counts.items()}


def print_optimizer_step_bytes():
    print(f"masked RMSprop step, bytes moved per step (counted from parameter numbers, not measured): today's "
          f"masked_step {MASKED_STEP_BYTES} B per fp32 parameter, kept or skipped; the fused kernel "
          f"{FUSED_KEPT_BYTES} B kept, the flag alone skipped")
    totals = [0, 0, 0, 0]
    for name, row in optimizer_step_bytes().items():
        totals = [t + v for t, v in zip(totals, row)]
        n, masked, kept, skipped = row
        print(f"  {name}: {n / 1e6:.2f} M parameters; masked_step {masked / 1e6:.1f} MB, fused {kept / 1e6:.1f} MB "
              f"kept / {skipped / 1e3:.1f} KB skipped; saves {(masked - kept) / 1e6:.1f} MB kept, "
              f"{(masked - skipped) / 1e6:.1f} MB skipped")
    n, masked, kept, skipped = totals
    kept_us, skipped_us = ((masked - bytes_) / BANDWIDTH * 1e6 for bytes_ in (kept, skipped))
    print(f"  all three: {n / 1e6:.2f} M parameters; masked_step {masked / 1e6:.1f} MB per step, fused "
          f"{kept / 1e6:.1f} MB with every update kept: saves {(masked - kept) / 1e6:.1f} MB per step, an "
          f"estimated {kept_us:.0f} us at {BANDWIDTH / 1e12:.1f} TB/s (an estimate from the count, not a "
          f"measurement); {(masked - skipped) / 1e6:.1f} MB, {skipped_us:.0f} us, if all three were skipped")


if __name__ == "__main__":
    torch.set_num_threads(1)
    saved_per_pass = per_image_layers_flops()
    print(f"torch {torch.__version__}; per-image discriminator layers (conv 5x5 3->32, ReLU, conv 5x5 32->128 "
          f"stride 2), forward + input gradient: {saved_per_pass / 1e6:.1f} MFLOP per real image per frozen pass")
    for kind, saturating, passes in (("vaegan", True, 1), ("vaegan", False, 2), ("vae-disl", True, 1)):
        after = routed_flops(kind, saturating)
        saved = passes * saved_per_pass
        print(f"{kind}, {'minimax' if saturating else 'non-saturating'} decoder term: routed step {after / 1e9:.3f} "
              f"GFLOP/image; the lever saves {saved / 1e6:.1f} MFLOP/image ({saved / (after + saved) * 100:.2f}% of "
              f"{(after + saved) / 1e9:.3f} before)")
    print_optimizer_step_bytes()
