"""The segmentation task: the U-Net, its tiles, data, weight map and optimizer made concrete.

The training loop (`train/loop.py`) runs it as it runs a diffusion experiment,
through the `train.task.Task` interface: `init_state`, `train_step_fn`,
`make_train_iterator`, `periodic_hooks`, `resume_rules`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import configlib, files, models, parallel
from diffusion_jax import images as image_utils
from diffusion_jax.config.optim import OptimConfig
from diffusion_jax.config.segmentation import (
  SECTIONS,
  AugmentConfig,
  SegmentationDataConfig,
  WeightMapConfig,
)
from diffusion_jax.config.train import TrainConfig
from diffusion_jax.configlib import from_mapping
from diffusion_jax.segmentation import data, metrics, step, tiling
from diffusion_jax.train import optimizer
from diffusion_jax.train.run_config import FIXED_BY_RUN
from diffusion_jax.train.task import Hook
from diffusion_jax.train.state import TrainState

PANEL_IMAGES = 4  # held-out images in each image | truth | prediction PNG
EVAL_CHUNK = 16  # held-out images whose tiles are predicted together


@dataclasses.dataclass(frozen=True)
class SegmentationExperiment:
  """A segmentation config made concrete."""

  config: ml_collections.ConfigDict
  model: nn.Module  # [B, T, T, C] -> logits [B, O, O, K]
  data: SegmentationDataConfig
  weight_map: WeightMapConfig
  augment: AugmentConfig
  optim: OptimConfig
  train: TrainConfig
  tiles: data.TileShape

  resume_rules: ClassVar[Mapping[str, str]] = {  # this task's rows of run_config's rules
    "weight_map": FIXED_BY_RUN,  # what the loss weighs, as the data: what the run trains on
    "augment": FIXED_BY_RUN,
  }

  @property
  def num_classes(self) -> int:
    return self.model.num_classes

  @property
  def alignment(self) -> int:
    """The network's pooling factor 2^depth: tiles are placed a multiple of it apart."""
    return 2**self.model.depth

  def apply_fn(self, params, images: jax.Array) -> jax.Array:
    """Logits [B, O, O, K] of images [B, T, T, C] in [-1, 1]."""
    return self.model.apply({"params": params}, images)

  def step_fns(self) -> step.SegmentationStepFns:
    tx, lr_schedule = optimizer.make_optimizer(self.optim)
    return step.SegmentationStepFns(
      apply=self.apply_fn,
      tx=tx,
      lr_schedule=lr_schedule,
      ema_decay=self.train.ema_decay,
      keep_last_finite=self.train.on_nonfinite == "skip",
    )

  def train_step_fn(self):
    """The pure `(state, batch) -> (state, metrics)` the loop jits."""
    return functools.partial(step.train_step, fns=self.step_fns())

  def counted_step_fn(self):
    """None: the step has no microbatch loop and no remat, so XLA counts it right (train/task.py)."""
    return None

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh TrainState, weights He-initialised (the model's); jit it with out_shardings."""
    init_key, state_key = jax.random.split(rng)
    params = self.model.init(init_key, jnp.zeros((1, *self._input_shape())))["params"]
    return TrainState(
      step=jnp.array(0, jnp.int32),
      params=params,
      ema_params=params,
      opt_state=self.step_fns().tx.init(params),
      rng=state_key,
      sampler_state=(),
    )

  def make_train_iterator(self):
    return data.make_train_iterator(
      self.data, self.train.batch_size, self.tiles, self.num_classes, self.weight_map, self.augment
    )

  def _input_shape(self) -> tuple[int, int, int]:
    return (self.tiles.tile, self.tiles.tile, self.data.num_channels)

  def make_predictor(self, mesh, batch_size: int):
    """`predict(params, tiles [B, T, T, C]) -> logits [B, O, O, K]` as numpy, B = batch_size.

    The tiles are split over the mesh's devices; every process passes (and gets) all of them.
    """
    sharding = parallel.batch_sharding(mesh)
    apply = jax.jit(
      self.apply_fn, out_shardings=sharding, compiler_options=parallel.compiler_options(mesh)
    )

    def predict(params, tiles):
      tiles = jax.make_array_from_process_local_data(sharding, tiles, tiles.shape)
      return multihost_utils.process_allgather(apply(params, tiles), tiled=True)

    return predict

  def periodic_hooks(self, mesh, workdir: str) -> list[Hook]:
    """The loop's periodic action: the held-out evaluation with its PNG, every train.eval_every."""
    return [Hook("eval", self.train.eval_every, make_eval_hook_run(self, mesh, workdir))]


def make_eval_hook_run(exp: SegmentationExperiment, mesh, workdir: str):
  """The eval Hook's `run(state, step, writer)`: IoU of the EMA parameters on held-out images.

  (Diffusion's `periodic_eval.make_evaluator` returns scores instead, which its
  hook writes.)

  Each whole image is predicted by overlap-tile inference; the scalars
  (`metrics.summary`) go to the writer, and a PNG of image | truth |
  prediction to WORKDIR/segmentation/step_<step>.png and TensorBoard. The
  held-out images are read now, so a bad one fails at start.
  """
  images, masks = data.load_eval_set(exp.data, exp.num_classes)
  batch_size = mesh.size * max(1, 8 // mesh.size)
  predict = exp.make_predictor(mesh, batch_size)

  def evaluate(state: TrainState, step_number: int, writer) -> None:
    predict_tiles = functools.partial(predict, state.ema_params)
    predictions = []
    for start in range(0, len(images), EVAL_CHUNK):
      logits = tiling.predict_images(
        predict_tiles,
        images[start : start + EVAL_CHUNK],
        exp.tiles.tile,
        exp.tiles.output,
        exp.alignment,
        batch_size,
      )
      predictions += [np.argmax(image_logits, -1) for image_logits in logits]
    confusion = sum(
      metrics.confusion_matrix(mask, prediction, exp.num_classes)
      for mask, prediction in zip(masks, predictions)
    )
    writer.write_scalars(step_number, metrics.summary(confusion))
    shown = min(PANEL_IMAGES, len(images))
    if jax.process_index() == 0 and len({m.shape for m in masks[:shown]}) == 1:
      pixels = image_utils.to_uint8(np.stack(images[:shown]))
      picture = metrics.panel(pixels, np.stack(masks[:shown]), np.stack(predictions[:shown]))
      path = files.join(workdir, "segmentation", f"step_{step_number:08d}.png")
      image_utils.save_png(picture, path)
      writer.write_images(step_number, {"segmentation": picture[None]})
      logging.info("Wrote %s.", path)

  return evaluate


def _tile_shape(model: nn.Module, tile: int, num_channels: int) -> data.TileShape:
  """The model's output side for a tile x tile input; a clear error if it cannot take it."""
  try:
    out = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, tile, tile, num_channels)))[0]
    )
  except ValueError as e:
    raise ValueError(f"data.tile_size={tile} does not fit the model: {e}") from e
  if out.ndim != 4 or out.shape[1] != out.shape[2]:
    raise ValueError(
      f"The model maps a {tile}x{tile} tile to {out.shape[1:]}, not to square"
      " logits [O, O, classes]."
    )
  return data.TileShape(tile, out.shape[1])


def build(
  config: ml_collections.ConfigDict, model: nn.Module | None = None
) -> SegmentationExperiment:
  """Checks a segmentation config (`task = "segmentation"`) and builds its parts.

  `model`, when given, replaces `config.model`; it needs `num_classes` and
  `depth` fields, as `RonnebergerUNet` has.
  """
  configlib.check_known(config, SECTIONS, "config")
  data_config = SegmentationDataConfig.from_mapping(config.data)
  model = models.get_model(dict(config.model)) if model is None else model
  for field in ("num_classes", "depth"):
    if not hasattr(model, field):
      raise ValueError(
        f"A segmentation model needs a `{field}` field, as RonnebergerUNet has;"
        f" {type(model).__name__} has none."
      )
  train_config = from_mapping(TrainConfig, config.train, "train")
  if train_config.grad_accum_steps != 1:
    raise ValueError(
      "train.grad_accum_steps must be 1 for segmentation (one tile batch per"
      f" step), got {train_config.grad_accum_steps}."
    )
  return SegmentationExperiment(
    config=config,
    model=model,
    data=data_config,
    weight_map=from_mapping(WeightMapConfig, config.weight_map, "weight_map"),
    augment=from_mapping(AugmentConfig, config.augment, "augment"),
    optim=OptimConfig.from_mapping(config.optim),
    train=train_config,
    tiles=_tile_shape(model, data_config.tile_size, data_config.num_channels),
  )
