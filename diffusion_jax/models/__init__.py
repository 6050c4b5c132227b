"""Flax U-Nets for diffusion models, and the zoo of published settings.
What it exports:

  UNet             the DDPM / Improved DDPM / ADM noise-prediction U-Net.
  RonnebergerUNet  the classic segmentation U-Net (Ronneberger et al. 2015).
  get_model        builds a zoo entry by name, with field overrides.
"""

from diffusion_jax.models.layers import (
  AttentionBlock,
  Downsample,
  ResBlock,
  TimeEmbedding,
  Upsample,
  timestep_embedding,
)
from diffusion_jax.models.ronneberger import RonnebergerUNet, center_crop, valid_output_size
from diffusion_jax.models.unet import UNet
from diffusion_jax.models.zoo import (
  MODEL_ZOO,
  UntrustedModelCodeError,
  ZooEntry,
  abstract_init,
  check_trusted,
  count_params,
  entry_shapes,
  get_model,
  lookup,
  param_count,
  zoo_table,
)

__all__ = [
  "MODEL_ZOO",
  "AttentionBlock",
  "Downsample",
  "ResBlock",
  "RonnebergerUNet",
  "TimeEmbedding",
  "UNet",
  "UntrustedModelCodeError",
  "Upsample",
  "ZooEntry",
  "abstract_init",
  "check_trusted",
  "center_crop",
  "count_params",
  "entry_shapes",
  "get_model",
  "lookup",
  "param_count",
  "timestep_embedding",
  "valid_output_size",
  "zoo_table",
]
