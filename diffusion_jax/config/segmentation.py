"""The segmentation task's sections, and `complete_config`, which its config files end with.
The sections:

  data        SegmentationDataConfig: image/mask pairs, tiles, held-out images
  weight_map  WeightMapConfig: the loss's weight map (Ronneberger et al. 2015, eq. 2)
  augment     AugmentConfig: the random transforms of the training tiles (Sec. 3.1)
  train       TrainConfig: the task-neutral loop (config/train.py); one tile batch per step
  optim, model as for diffusion (config/optim.py, config/models.py)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from diffusion_jax import configlib
from diffusion_jax.config import models
from diffusion_jax.config.optim import OptimConfig
from diffusion_jax.config.train import TrainConfig
from diffusion_jax.configlib import from_mapping

SOURCES = ("cells", "tfds", "folder")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SegmentationDataConfig:
  """Where the image/mask pairs come from and how they are prepared.

  source "cells": synthetic cell images (`synthetic.py`), offline. "tfds": a
  TFDS dataset's `image_key` and `mask_key` features (e.g. oxford_iiit_pet's
  "image" and "segmentation_mask", whose labels 1..3 become 0..2 with
  mask_offset 1). "folder": PATH/SPLIT/images/NAME.png with
  PATH/SPLIT/masks/NAME.png holding class indices.
  """

  source: str = "cells"
  split: str = "train"  # training split ("train" / "test" for cells and folders)
  eval_split: str = "test"  # held-out split of the IoU evaluation
  eval_images: int = 0  # held-out images evaluated (the first ones); 0: all
  name: str = ""  # TFDS dataset (source "tfds")
  image_key: str = "image"  # TFDS feature holding the image
  mask_key: str = "segmentation_mask"  # TFDS feature holding the mask
  mask_offset: int = 0  # subtracted from the stored labels (oxford_iiit_pet: 1)
  path: str = ""  # root of the split folders (source "folder")
  num_channels: int = 1  # 1 (gray) or 3 (RGB); other images are converted
  tile_size: int = 316  # pixels: the network's input tile; its output is smaller by the context
  resize: int = 0  # pixels: scale each image's short side to this (masks: nearest); 0 keeps
  num_images: int = 64  # synthetic training images (source "cells")
  num_eval_images: int = 16  # synthetic held-out images (source "cells")
  image_size: int = 128  # pixels: side of the synthetic images (source "cells")
  shuffle: bool = True
  seed: int = 0  # seeds the synthetic images, the shuffle and the augmentation
  num_threads: int = 2  # threads preparing batches ahead; 0: in the main thread

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"Unknown data.source {self.source!r}; known: {list(SOURCES)}.")
    if self.source == "tfds" and not self.name:
      raise ValueError("data.source 'tfds' needs data.name (e.g. 'oxford_iiit_pet').")
    if self.source == "folder" and not self.path:
      raise ValueError("data.source 'folder' needs data.path.")
    if self.num_channels not in (1, 3):
      raise ValueError(f"data.num_channels must be 1 or 3, got {self.num_channels}.")
    for key in ("resize", "eval_images", "num_threads"):
      if getattr(self, key) < 0:
        raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}.")
    for key in ("num_images", "num_eval_images", "image_size", "tile_size"):
      if getattr(self, key) <= 0:
        raise ValueError(f"data.{key} must be positive, got {getattr(self, key)}.")

  @classmethod
  def from_mapping(cls, mapping: Any) -> "SegmentationDataConfig":
    return from_mapping(cls, mapping, "data")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightMapConfig:
  """Settings of eq. 2; the paper uses w_0 = 10 and sigma ~ 5 pixels."""

  w0: float = 10.0  # weight of the border term; 0 turns it off
  sigma: float = 5.0  # pixels
  balance_classes: bool = True  # w_c = 1 / class frequency (normalised); False: w_c = 1
  background_class: int = 0  # objects are the connected components of the other classes

  def __post_init__(self):
    configlib.check_ranges(
      self, "weight_map", {"w0": configlib.NON_NEGATIVE, "sigma": configlib.POSITIVE}
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentConfig:
  """Random transforms of the training tiles; each can be turned off."""

  elastic_sigma: float = 10.0  # pixels: std of the displacements on the coarse grid (paper: 10)
  elastic_grid: int = 3  # the coarse grid's nodes per side (paper: 3x3)
  max_rotation: float = 180.0  # degrees: angles drawn from [-max, max]
  flip: bool = True  # mirror left-right with probability 1/2
  brightness: float = 0.1  # intensities in [0, 1] shifted by U(-b, b)
  contrast: float = 0.2  # ... and scaled about 0.5 by U(1 - c, 1 + c)

  def __post_init__(self):
    configlib.check_ranges(
      self,
      "augment",
      {
        "elastic_grid": configlib.Range(2),
        **dict.fromkeys(
          ("elastic_sigma", "max_rotation", "brightness", "contrast"), configlib.NON_NEGATIVE
        ),
      },
    )


SECTIONS = ("seed", "task", "data", "model", "weight_map", "augment", "optim", "train")
# The dataclass of each section but model (the zoo's) and the scalars.
SECTION_CLASSES = {
  "data": SegmentationDataConfig,
  "weight_map": WeightMapConfig,
  "augment": AugmentConfig,
  "optim": OptimConfig,
  "train": TrainConfig,
}


def complete_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with every field its sections know, as `config.diffusion.complete_config` does.

  Each section holds all fields of its dataclass (`SECTION_CLASSES`, the zoo
  entry's architecture for `model`), so the command line can override any of
  them. Segmentation config files end with it; a key no section knows is a
  ValueError naming it.
  """
  configlib.check_known(config, SECTIONS, "config")
  complete = ml_collections.ConfigDict()
  complete.seed = config.get("seed", 0)
  complete.task = "segmentation"
  complete.model = models.model_section(config.model)
  for name, cls in SECTION_CLASSES.items():
    complete[name] = configlib.section(cls, config.get(name), name=name)
    from_mapping(cls, complete[name], name)  # checks its values; `build` again after overrides
  return complete
