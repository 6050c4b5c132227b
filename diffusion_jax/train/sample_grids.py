"""The diffusion task's periodic hooks: sample grids from the EMA parameters, and their quality.

Every train.sample_every steps the grid sampler draws train.num_samples images
into WORKDIR/samples/step_<step>.png and TensorBoard; every train.eval_every
steps periodic_eval.py scores eval_num_samples of them (`fid` or `fd_digits`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import files, images, parallel, sampling
from diffusion_jax.train import periodic_eval
from diffusion_jax.train.state import TrainState
from diffusion_jax.train.task import Hook

if TYPE_CHECKING:
  from diffusion_jax.train.diffusion_task import Experiment

GRID_MIN_SIZE = 32  # pixels: smaller samples are enlarged in the PNG grids


class GridSampler(NamedTuple):
  """The sampler of the training run's sample grids.

  `sample(ema_params, key)` -> float32 [padded_size, H, W, C], split over the
  mesh's data axis; the grid is its first `num_samples` images.
  """

  sample: Callable[[Any, jax.Array], jax.Array]
  num_samples: int


def make_grid_sampler(exp: Experiment, mesh) -> GridSampler:
  """The train.num_samples images of the sample grids, each device drawing its share.

  The batch is padded to a multiple of the mesh's data axis (the extra images
  are drawn and dropped). All noise is drawn at the padded shape from one key;
  under JAX's partitionable threefry the first num_samples images of such a
  draw do not depend on the padding, so a seed gives the same grid on any
  number of devices. A class-conditional model draws one class per row of the
  grid (`sampling.grid_labels`), guided with train.sample_guidance.
  """
  config = sampling.SamplerConfig(
    sampler=exp.train.sampler,
    steps=exp.train.sample_steps,
    guidance_scale=exp.train.sample_guidance,
  )
  num_samples, num_classes = exp.train.num_samples, exp.num_classes
  padded_size = -(-num_samples // mesh.shape[parallel.DATA_AXIS]) * mesh.shape[parallel.DATA_AXIS]
  labels = (
    None
    if num_classes is None
    else np.pad(sampling.grid_labels(num_samples, num_classes), (0, padded_size - num_samples))
  )
  sample = jax.jit(
    sampling.make_batch_sampler(
      config,
      exp.apply_fn,
      exp.spec,
      exp.schedule,
      exp.image_shape,
      padded_size,
      num_classes=num_classes,
      labels=labels,
    ),
    out_shardings=parallel.batch_sharding(mesh),
    compiler_options=parallel.compiler_options(mesh),
  )
  return GridSampler(sample, num_samples)


def write_samples(
  grid_sampler: GridSampler, state: TrainState, step: int, seed: int, workdir: str, writer
):
  """Samples from the EMA parameters into samples/step_<step>.png and TensorBoard.

  Every process calls it (the images are gathered from all devices); process 0 writes.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  sharded = grid_sampler.sample(state.ema_params, key)
  samples = images.to_uint8(
    multihost_utils.process_allgather(sharded, tiled=True)[: grid_sampler.num_samples]
  )
  if jax.process_index() == 0:
    path = files.join(workdir, "samples", f"step_{step:08d}.png")
    images.save_image_grid(samples, path, min_size=GRID_MIN_SIZE)
    writer.write_images(step, {"samples": images.make_image_grid(samples)[None]})
    logging.info("Wrote %d samples to %s.", len(samples), path)


def periodic_hooks(exp: Experiment, mesh, workdir: str) -> list[Hook]:
  """A diffusion run's hooks: sample grids (train.sample_every) and their quality (eval_every)."""
  grid_sampler = make_grid_sampler(exp, mesh)
  seed = exp.config.seed + 1

  def sample(state, step, writer):
    write_samples(grid_sampler, state, step, seed, workdir, writer)

  hooks = [Hook("sample", exp.train.sample_every, sample)]
  if exp.train.eval_every:
    evaluator = periodic_eval.make_evaluator(exp, mesh, workdir)
    hooks.append(
      Hook(
        "eval",
        exp.train.eval_every,
        lambda state, step, writer: writer.write_scalars(step, evaluator(state.ema_params, step)),
      )
    )
  return hooks
