"""A converted checkpoint: the zoo U-Net's fields, the process, the parameters, the run config."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from diffusion_jax import weightfiles
from diffusion_jax.convert.mapping import ConvertError, Rules, StateDict, assemble
from diffusion_jax.models import unet, zoo

# config.model.name of every converted model: the U-Net class itself, all its fields given.
UNET_FACTORY = "diffusion_jax.models.unet:UNet"

# The largest U-Net a converter builds: above every published diffusion checkpoint (the largest,
# guided-diffusion's 512x512, has 256 x 4 channels, 7 levels, 2 blocks), and small enough that a
# foreign config or state dict asking for more fails at once instead of building for hours.
MAX_CHANNELS = 8192
MAX_LEVELS = 8
MAX_BLOCKS = 16
MAX_IMAGE_SIZE = 4096
MAX_IMAGE_CHANNELS = 64
MAX_HEADS = 1024
MAX_CLASSES = 100_000
MAX_TIMESTEPS = 100_000
# models.UNet fields and the image's size and channels -> (min, max).
UNET_BOUNDS = dict(
  ch=(1, MAX_CHANNELS),
  ch_mult=(1, MAX_CHANNELS),
  num_res_blocks=(1, MAX_BLOCKS),
  num_classes=(1, MAX_CLASSES),
  num_heads=(-1, MAX_HEADS),
  num_head_channels=(1, MAX_CHANNELS),
  image_size=(1, MAX_IMAGE_SIZE),
  image_channels=(1, MAX_IMAGE_CHANNELS),
)


@dataclasses.dataclass(frozen=True)
class Converted:
  """A published checkpoint in the zoo's terms.

  Attributes:
    model: fields of `models.UNet`.
    diffusion: fields of `config.diffusion.DiffusionConfig` (schedule, T, parameterisation, rescale_timesteps).
    image_shape: (H, W, C) the model was trained on.
    params: the Flax parameter tree, float32 numpy arrays.
    step: the source's training step, 0 when unknown.
    source: what was converted: format, path, preset, flags (written to convert.json).
    dataset: TFDS name of the training data when known (for data.name), else "".
  """

  model: dict[str, Any]
  diffusion: dict[str, Any]
  image_shape: tuple[int, int, int]
  params: Any
  step: int
  source: dict[str, Any]
  dataset: str = ""

  def config(self) -> ml_collections.ConfigDict:
    """The run config `experiment.build` reads: the model, the process, the data's shape."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = dict(
      source="tfds",
      name=self.dataset or "unknown",
      image_size=self.image_shape[0],
      num_channels=self.image_shape[2],
      random_flip=False,
    )
    config.model = dict(name=UNET_FACTORY, **self.model)
    config.diffusion = dict(self.diffusion)
    config.optim = {}
    config.train = {}
    return config


def build_params(
  model: Mapping[str, Any], image_shape: tuple[int, int, int], rules: Rules, state: StateDict
) -> Any:
  """The UNet(**model) parameters filled from `state` by `rules`; errors name the file and keys."""
  if image_shape[0] != image_shape[1]:
    raise ConvertError(f"{state.origin}: only square images are supported, got {image_shape}")
  abstract = zoo.abstract_init(unet.UNet(**model), image_shape)[1]["params"]
  try:
    return assemble(rules, abstract, state)
  except ConvertError as e:
    raise ConvertError(f"{state.origin}: {e}") from None


def check_bounds(
  values: Mapping[str, Any], bounds: Mapping[str, tuple[int, int]], origin: str
) -> None:
  """Each `bounds` key of `values` is an int in [min, max], or a list of at most MAX_LEVELS.

  Keys absent or None are skipped (a default applies). A ConvertError names
  the key, its value (quoted) and the bound.
  """
  for key, (low, high) in bounds.items():
    value = values.get(key)
    items = value if isinstance(value, (list, tuple)) else [value]
    if value is None or (
      len(items) <= MAX_LEVELS and all(type(v) is int and low <= v <= high for v in items)
    ):  # pylint: disable=unidiomatic-typecheck
      continue
    raise ConvertError(
      f"{origin}: {key} {weightfiles.quote(value)} is out of bounds: expected"
      f" integers in [{low}, {high}]"
      f"{f', at most {MAX_LEVELS} of them' if items is value else ''}"
    )


def check_unet(model: Mapping[str, Any], image_shape: tuple[int, int, int], origin: str) -> None:
  """The U-Net fields a converter read (from tensors or flags) within UNET_BOUNDS, before any build."""
  check_bounds(
    {**model, "image_size": image_shape[0], "image_channels": image_shape[2]}, UNET_BOUNDS, origin
  )


def resolutions(image_size: int, levels: list[int]) -> tuple[int, ...]:
  """Side lengths in pixels of the U-Net levels in `levels` (level l is image_size / 2^l)."""
  return tuple(image_size >> level for level in levels)


def check_choice(value: Any, known: Mapping[Any, Any] | tuple, what: str, origin: str) -> Any:
  """known[value] (or value, for a tuple of known values); a ConvertError names `what` otherwise."""
  if value not in known:
    raise ConvertError(
      f"{origin}: unsupported {what} {weightfiles.quote(value)}; supported: {list(known)}"
    )
  return known[value] if isinstance(known, Mapping) else value


def typed_flags(
  flags: Mapping[str, Any], types: Mapping[str, Callable[[Any], Any]], source: str
) -> dict[str, Any]:
  """`flags` in their types (strings too, as on a command line); an unknown or bad flag is named."""
  if unknown := sorted(set(flags) - set(types)):
    raise ConvertError(f"unknown {source} flag(s) {unknown}; known: {sorted(types)}")
  typed = {}
  for name, value in flags.items():
    try:
      typed[name] = types[name](value)
    except ValueError as e:
      raise ConvertError(f"{source} flag {name}={value!r}: {e}") from None
  return typed
