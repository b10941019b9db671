"""Which optimizers step: the authors' equilibrium rule (`model/aegan.py`) and the non-finite guard.

The host-side rule (`equilibrium_decisions`, on Python floats) is the reference; the training step
decides on the device (`equilibrium_masks`, `step_decisions`: 0-d bool tensors, no synchronisation),
and the tests hold the two to the same answers.
"""
import torch

from .gradients import STEP_STATS

# The stats whose non-finite value stops every update of the step (the pixel error is a diagnostic:
# when it is not finite, llike is not either).
GUARDED_STATS = tuple(name for name in STEP_STATS if name != "pixel_error")


def equilibrium_decisions(cfg, real_cost, fake_cost):
    """(update_decoder, update_discriminator) by the authors' equilibrium rule.

    Skip the discriminator if either cost is below value - margin (it is winning), the decoder
    if either is above value + margin (it is losing); if both would be skipped, update both.
    Takes Python floats. The encoder always updates.
    """
    if not cfg.equilibrium or cfg.kind in ("vae",):
        return True, True
    low, high = cfg.equilibrium_value - cfg.margin, cfg.equilibrium_value + cfg.margin
    update_dis = not (real_cost < low or fake_cost < low)
    update_dec = not (real_cost > high or fake_cost > high)
    if cfg.kind == "vae-disl":  # the decoder learns from L_llike alone: the rule only paces the discriminator
        return True, update_dis
    if not update_dis and not update_dec:
        return True, True
    return update_dec, update_dis


def equilibrium_masks(cfg, real_cost, fake_cost):
    """equilibrium_decisions on the device: 0-d bool tensors (update_decoder, update_discriminator),
    from the costs as tensors, with no synchronisation."""
    if not cfg.equilibrium or cfg.kind in ("vae",):
        yes = torch.ones((), dtype=torch.bool, device=real_cost.device)
        return yes, yes
    low, high = cfg.equilibrium_value - cfg.margin, cfg.equilibrium_value + cfg.margin
    real_cost, fake_cost = real_cost.double(), fake_cost.double()  # compared as the host compares: in float64
    update_dis = ~((real_cost < low) | (fake_cost < low))
    update_dec = ~((real_cost > high) | (fake_cost > high))
    if cfg.kind == "vae-disl":
        return torch.ones_like(update_dec), update_dis
    neither = ~update_dis & ~update_dec
    return update_dec | neither, update_dis | neither


def step_decisions(cfg, model, losses, costs):
    """({network: 0-d bool}, finite) on the device: a step whose losses (a list of 0-d tensors) or
    gradients are not all finite updates nothing; otherwise the equilibrium rule on costs, (real,
    fake) or None, paces the decoder and the discriminator."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = torch.stack([loss.float() for loss in losses]).isfinite().all()
    finite = finite & torch.stack(torch._foreach_norm(grads)).isfinite().all()
    update_dec = update_dis = finite
    if costs is not None:
        dec, dis = equilibrium_masks(cfg, *costs)
        update_dec, update_dis = dec & finite, dis & finite
    return {"encoder": finite, "decoder": update_dec, "discriminator": update_dis}, finite
