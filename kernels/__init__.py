"""Fused Triton kernels for the VAE/GAN's losses (reparameterisation+KL, feature likelihood, GAN
log-losses). Not yet built: the trainer runs on the reference losses in vaegan/losses.py."""
