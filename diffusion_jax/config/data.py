"""The `data` section: the input pipeline's own config, a frozen dataclass checked on creation."""

import dataclasses
from typing import Any

from diffusion_jax.configlib import from_mapping

# Names accepted by `DataConfig.source`; `sources.make_source` builds each one.
SOURCES = ("digits", "tfds", "folder")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Where the training images come from and how they are prepared.

  Attributes:
    source: one of `SOURCES`: "digits" (scikit-learn's 8x8 digits, in
      memory), "tfds" (a TFDS dataset read by random access) or "folder" (a
      directory of image files).
    name: TFDS dataset name, e.g. "cifar10", "mnist", "celeb_a_hq/256". Only
      for source="tfds".
    split: TFDS split, e.g. "train" or "train[:90%]"; for source="digits"
      "train" (1,497 digits) or "test" (the other 300).
    path: directory searched recursively for images. Only for
      source="folder".
    image_size: output height = width in pixels; other sizes are resized
      (short side) and centre-cropped.
    num_channels: output channels: 1 (grayscale) or 3 (RGB). Grayscale
      sources are repeated to 3 channels, RGB ones converted to luma.
    random_flip: flip each image horizontally with probability 1/2 (Ho et al.
      2020, Sec. 4).
    shuffle: shuffle the examples, differently in every epoch.
    seed: seeds the shuffle and the flips; same seed, same batches.
    num_threads: threads per process preparing batches ahead of the training
      step, one batch each; 0 prepares them in the main thread on demand.
  """

  source: str = "digits"
  name: str = ""
  split: str = "train"
  path: str = ""
  image_size: int = 32
  num_channels: int = 3
  random_flip: bool = True
  shuffle: bool = True
  seed: int = 0
  num_threads: int = 4

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"unknown data source '{self.source}'; known sources: {SOURCES}")
    if self.source == "tfds" and not self.name:
      raise ValueError("data source 'tfds' needs a dataset `name`")
    if self.source == "folder" and not self.path:
      raise ValueError("data source 'folder' needs a `path`")
    if not isinstance(self.image_size, int) or self.image_size <= 0:
      raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
    if self.num_channels not in (1, 3):
      raise ValueError(f"num_channels must be 1 or 3, got {self.num_channels!r}")
    if self.num_threads < 0:
      raise ValueError(f"num_threads must be >= 0, got {self.num_threads!r}")

  @classmethod
  def from_mapping(cls, mapping: Any) -> "DataConfig":
    """From a dict or ConfigDict; an unknown key is a ValueError naming it."""
    return from_mapping(cls, mapping, "data")
