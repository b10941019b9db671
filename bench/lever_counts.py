"""What the step's levers save, counted on a CPU with torch's FlopCounterMode (no GPU needed): FLOPs
per 64 px image of the routed step (one forward, one routed backward) for the paper's networks,
and of the work each lever removes. `python bench/lever_counts.py` prints a table.

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
