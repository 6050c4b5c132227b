"""The settings of each architecture and zoo entry: the `model` section, without Flax.

Each Flax module of `diffusion_jax.models` inherits its fields from its
settings dataclass here (`UNet(UNetSettings, nn.Module)`), so a config can
list, default and check every field of a model without importing Flax. The
zoo (models/zoo.py) pairs each `ZOO_SETTINGS` entry with its module, paper and
parameter count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import ml_collections

from diffusion_jax import configlib


@dataclasses.dataclass(kw_only=True)
class UNetSettings:
  """The fields of `models.UNet` (documented there) and their defaults."""

  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.0
  learn_sigma: bool = False
  num_classes: int | None = None
  scale_shift_norm: bool = False
  resblock_updown: bool = False
  num_heads: int = 1
  num_head_channels: int | None = None
  time_embedding: str = "ddpm"  # "ddpm" or "adm" (layers.TimeEmbeddingKind)
  downsample_padding: str | int = "SAME"
  norm_eps: float = 1e-6
  dtype: Any = "float32"  # computation dtype, a name or a JAX dtype
  remat: bool = False
  attention_impl: str = "auto"  # "auto", "xla" or "cudnn" (layers.fused_attention)


@dataclasses.dataclass(kw_only=True)
class RonnebergerSettings:
  """The fields of `models.RonnebergerUNet` (documented there) and their defaults."""

  num_classes: int = 2
  features: int = 64
  depth: int = 4
  padding: Literal["VALID", "SAME"] = "VALID"


# DDPM (Ho et al. 2020, App. B) with the conventions of its TF code.
_DDPM = dict(
  ch=128,
  num_res_blocks=2,
  attn_resolutions=(16,),
  time_embedding="ddpm",
  downsample_padding="SAME",
  norm_eps=1e-6,
)
# Shared by the iDDPM (openai/improved-diffusion) and ADM (openai/guided-diffusion) models: the
# conventions of their PyTorch code (ADM sinusoid, symmetric padding, GroupNorm eps 1e-5), AdaGN
# (their default), learned variance, 3 blocks per level.
_OPENAI = dict(
  time_embedding="adm",
  downsample_padding=1,
  norm_eps=1e-5,
  scale_shift_norm=True,
  learn_sigma=True,
  num_res_blocks=3,
)


@dataclasses.dataclass(frozen=True)
class ZooSettings:
  """A zoo entry's architecture (its settings class) and the fields that make it the paper's."""

  architecture: type
  kwargs: Mapping[str, Any]


ZOO_SETTINGS: dict[str, ZooSettings] = {
  "ddpm_cifar10": ZooSettings(UNetSettings, {**_DDPM, "ch_mult": (1, 2, 2, 2), "dropout": 0.1}),
  "ddpm_celebahq256": ZooSettings(UNetSettings, {**_DDPM, "ch_mult": (1, 1, 2, 2, 4, 4)}),
  "ddpm_lsun256": ZooSettings(UNetSettings, {**_DDPM, "ch_mult": (1, 1, 2, 2, 4, 4)}),
  "iddpm_cifar10": ZooSettings(
    UNetSettings,
    {
      **_OPENAI,
      "ch": 128,
      "ch_mult": (1, 2, 2, 2),
      "attn_resolutions": (16, 8),
      "num_heads": 4,
      "dropout": 0.3,
    },
  ),
  "iddpm_imagenet64": ZooSettings(
    UNetSettings,
    {**_OPENAI, "ch": 128, "ch_mult": (1, 2, 3, 4), "attn_resolutions": (16, 8), "num_heads": 4},
  ),
  "adm_imagenet64_cond": ZooSettings(
    UNetSettings,
    {
      **_OPENAI,
      "ch": 192,
      "ch_mult": (1, 2, 3, 4),
      "attn_resolutions": (32, 16, 8),
      "num_head_channels": 64,
      "resblock_updown": True,
      "num_classes": 1000,
      "dropout": 0.1,
    },
  ),
  "unet_ronneberger": ZooSettings(
    RonnebergerSettings, {"num_classes": 2, "features": 64, "depth": 4, "padding": "VALID"}
  ),
}


def is_factory(name: str) -> bool:
  """Whether a model name is a factory, "package.module:factory", rather than a zoo entry."""
  return ":" in name


def zoo_settings(name: str) -> ZooSettings:
  """The settings of zoo entry `name`; a ValueError lists the known names."""
  if name not in ZOO_SETTINGS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(ZOO_SETTINGS)}")
  return ZOO_SETTINGS[name]


def split_name(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """(name, the other fields) of a model section; a ValueError when it has no `name`."""
  fields = dict(config)
  if "name" not in fields:
    raise ValueError(
      f"a model config needs a 'name' key (one of {', '.join(ZOO_SETTINGS)}); got {sorted(fields)}"
    )
  return fields.pop("name"), fields


def model_section(model: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config's model section with every field of its zoo entry's architecture.

  `model` ({"name": ..., **overrides}) over the entry's settings over the
  architecture's defaults, so that any field (dtype, remat, ...) can be set on
  the command line. A factory's ("package.module:factory") arguments are its
  own: its section is `model` as given.
  """
  name, values = split_name(model)
  if is_factory(name):
    return ml_collections.ConfigDict(dict(model))
  entry = zoo_settings(name)
  section = configlib.section(entry.architecture, values, name="model", defaults=entry.kwargs)
  section.name = name
  return section
