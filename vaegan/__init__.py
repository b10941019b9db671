"""vaegan: a fast, exact trainer for the VAE/GAN of Larsen et al., ICML 2016."""
__version__ = "0.1.0"


def load(path, device="cpu"):
    """The model of a run directory or checkpoint file, in eval mode.

    It has encode(x) -> (mu, logvar), decode(z), reconstruct(x) and sample(n, seed=...); the
    conditional models take `attributes=` (N, A) of +-1 in each (names in `attribute_names`);
    images are (N, C, H, W) in [-1, 1]. `run_config` and `run_step` say how and how far it was trained.
    """
    from .checkpoint import load as load_checkpoint
    from .models import VAEGAN

    state = load_checkpoint(path)
    cfg = state["config"]
    names = cfg.get("attributes")
    model = VAEGAN(cfg["model"], cfg["image_size"], cfg["channels"], cfg["latent_size"], cfg["fc_width"],
                   names.split(",") if names else (), cfg.get("width", 1.0), cfg.get("up_conv", "transposed"))
    model.load_state_dict(state["model"])
    model.run_config, model.run_step = cfg, state["step"]
    return model.to(device).eval()
