"""diffusion_jax: denoising diffusion models (DDPM, Improved DDPM) in JAX/Flax."""

__version__ = "0.1.0"
