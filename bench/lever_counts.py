"""What the step's levers save, counted on a CPU (no GPU needed): FLOPs per 64 px image of the routed
step (one forward, one routed backward) for the paper's networks (torch's FlopCounterMode), the
matrix-product and convolution calls it makes, and the work each lever removes or adds, and the bytes the optimizer steps move. Counts,
not timings: each lever's gain in time is for a GPU to measure (bench/run_gpu.sh levers).
`python bench/lever_counts.py` prints them.

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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vaegan.gradients import UpdateConfig, compute_gradients  # noqa: E402
from vaegan.models import VAEGAN, pad_thin_convolutions  # noqa: E402

BATCH = 2  # FLOPs per image do not depend on it


def routed_flops(kind, saturating, pad=False, decoder_call="separate"):
    torch.manual_seed(0)
    model = VAEGAN(kind, 64, 3)
    if pad:
        pad_thin_convolutions(model)
    x, z_prior = torch.rand(BATCH, 3, 64, 64) * 2 - 1, torch.randn(BATCH, 128)
    with FlopCounterMode(display=False) as counter:
        compute_gradients(model, x, z_prior, UpdateConfig(kind=kind, saturating=saturating, decoder_call=decoder_call), 5)
    return counter.get_total_flops() / BATCH


PRODUCTS = {"aten.convolution.default": "convolution", "aten.convolution_backward.default": "convolution backward",
            "aten.mm.default": "matrix product", "aten.addmm.default": "matrix product"}


class ProductCalls(TorchDispatchMode):
    """Counts matrix products and convolutions, each a kernel on a GPU: a convolution's backward counts
    one for its input gradient and one for its weight gradient where it computes them."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) == "aten.convolution_backward.default":
            self.calls += sum(args[-1][:2])  # output_mask: input, weight, bias
        else:
            self.calls += str(func) in PRODUCTS
        return func(*args, **(kwargs or {}))


def product_calls(decoder_call, autocast):
    torch.manual_seed(0)
    model = VAEGAN("vaegan", 64, 3)
    x, z_prior = torch.rand(BATCH, 3, 64, 64) * 2 - 1, torch.randn(BATCH, 128)
    with ProductCalls() as counter:
        compute_gradients(model, x, z_prior, UpdateConfig(decoder_call=decoder_call), 5,
                          autocast_dtype=torch.bfloat16 if autocast else None)
    return counter.calls


def joint_decoder_counts():
    """--decoder-call joint: the same FLOPs; fewer, larger products (forward and input gradient over both
    halves at once; weight gradients stay per half)."""
    separate, joint = product_calls("separate", False), product_calls("joint", False)
    flops = routed_flops("vaegan", True), routed_flops("vaegan", True, decoder_call="joint")
    decoder_params = sum(p.numel() for p in VAEGAN("vaegan", 64, 3).decoder.parameters() if p.dim() > 1)
    return (f"decoder's two passes in one call (--decoder-call joint): {separate} -> {joint} matrix-product and "
            f"convolution calls per step (the decoder's forward and input-gradient products over 2B rows instead "
            f"of two over B; its weight gradients stay per half); routed step {flops[0] / 1e9:.3f} -> "
            f"{flops[1] / 1e9:.3f} GFLOP/image (the same work, but for the first layer's input gradient on the prior "
            f"half, which two calls skip); in eager bf16 each of the decoder's "
            f"{decoder_params / 1e6:.2f}M weights is cast once instead of twice ({decoder_params * 6 / 1e6:.1f} MB per "
            f"step not moved; a compiled step's graph casts them once either way), against fp32 copies of its "
            f"activations that the per-half BatchNorm makes in eager mode (inductor fuses them away)")


def padding_counts():
    """--pad-channels: FLOPs added by computing the 3-channel convolutions with 8 channels."""
    before, after = routed_flops("vaegan", True), routed_flops("vaegan", True, pad=True)
    return (f"3-channel convolutions padded to 8 (--pad-channels): routed step {before / 1e9:.3f} -> "
            f"{after / 1e9:.3f} GFLOP/image (+{(after - before) / 1e6:.1f} MFLOP, +{(after / before - 1) * 100:.2f}%, "
            f"of zeros) in exchange for channel counts the tensor cores take: a gain only a GPU can show")


def batchnorm_relu_traffic():
    """--fuse-bn-relu: the bytes of bf16 activations per image it moves less (or more), counted from the
    fused triples' BatchNorm inputs y (E elements) over every pass of the routed step, for a compiled step
    (inductor fuses the normalisation with the ReLU). Unfused forward: the statistics read y, the
    normalisation reads y and writes a = relu(bn(y)), the convolution reads a: 4 passes over E. Fused: the
    convolution reads y (1), and the statistics read y (1) unless the convolution that made y was fused too
    (its epilogue summed them: 0). Backward: the fused op recomputes a from y (1 read, 1 write) where the
    unfused step kept a from the forward pass: a is not held between the passes (memory) but moved twice more.
    Both backward figures are upper bounds: inductor's partitioner may recompute the unfused a itself.
    Only convolutions whose sums a BatchNorm reads compute them (with_sums), as counted here."""
    from vaegan.fused_layers import FUSED_SEQUENTIALS, is_fusable_triple
    torch.manual_seed(0)
    model = VAEGAN("vaegan", 64, 3)
    counts = {"forward_saved": 0, "backward_added": 0, "kept": 0, "calls": 0}

    def count(norm, inputs, output, epilogue_sums):
        elements = inputs[0].numel()
        counts["calls"] += 1
        counts["forward_saved"] += elements * (3 if epilogue_sums else 2)
        counts["backward_added"] += elements * 2
        counts["kept"] += elements

    hooks = []
    for name, network in model.networks().items():
        for attribute in FUSED_SEQUENTIALS[name]:
            layers = getattr(network, attribute)
            for i in range(len(layers)):
                if is_fusable_triple(layers, i):
                    epilogue_sums = i >= 3 and is_fusable_triple(layers, i - 3)
                    hooks.append(layers[i].register_forward_hook(
                        lambda m, a, o, e=epilogue_sums: count(m, a, o, e)))
    x, z_prior = torch.rand(BATCH, 3, 64, 64) * 2 - 1, torch.randn(BATCH, 128)
    compute_gradients(model, x, z_prior, UpdateConfig(), 5)
    for h in hooks:
        h.remove()
    forward, backward, kept = (counts[k] * 2 / BATCH for k in ("forward_saved", "backward_added", "kept"))
    net = forward - backward
    return (f"BatchNorm + ReLU fused into the convolutions (--fuse-bn-relu; the encoder's 2nd and 3rd, the "
            f"discriminator's 3rd and 4th, the decoder's last): {counts['calls']} fused calls per step; the forward "
            f"moves {forward / 1e6:.2f} MB per image less, the backward's recomputation {backward / 1e6:.2f} MB more: "
            f"net {net / 1e6:.2f} MB per image ({net * 512 / 1e9:.2f} GB per step at batch 512, "
            f"{net * 512 / BANDWIDTH * 1e3:.2f} ms at {BANDWIDTH / 1e12:.1f} TB/s, an estimate from the count), and "
            f"{kept / 1e6:.2f} MB per image of activations not held from the forward pass to the backward; the "
            f"same FLOPs (the kernel's own speed against cuDNN's is for a GPU to measure)")


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
# any step moves). This counts the masked step as it was (optimizers.masked_step_reference); the masked
# step now compiles as one graph (clone, functional step and torch.where together), which inductor may
# fuse into fewer passes: its bytes have not been counted from generated code nor measured.
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
    print(joint_decoder_counts())
    print(padding_counts())
    print(batchnorm_relu_traffic())
    print_optimizer_step_bytes()
