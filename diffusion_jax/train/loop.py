"""The training loop: restore or init, step, log, sample, checkpoint, stop cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils

from diffusion_jax import data, images, parallel, sampling
from diffusion_jax.train import checkpoint, experiment, periodic_eval, run_config, tasks
from diffusion_jax.train.step import TrainMetrics, TrainState, compute_metrics, merge_metrics


@dataclasses.dataclass(frozen=True)
class Hook:
  """A periodic action of the loop: `run(state, step, writer)` every `every` steps and at the last.

  `every` 0 runs it at the last step only. Each task's experiment lists its
  own (`periodic_hooks`): diffusion draws sample grids and scores them,
  segmentation measures IoU on held-out images.
  """

  name: str
  every: int
  run: Callable[[TrainState, int, metric_writers.MetricWriter], None]

  def due(self, step: int, last: bool) -> bool:
    return last or bool(self.every and step % self.every == 0)


def compile_train_step(exp, state_shardings, mesh, compiler_options: dict[str, str] | None = None):
  """jit of the experiment's train step: state shardings kept, batch over "data", old state donated.

  `compiler_options` (XLA's) default to `parallel.compiler_options(mesh)`.
  """
  if compiler_options is None:
    compiler_options = parallel.compiler_options(mesh)
  return jax.jit(
      exp.train_step_fn(),
      in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
      out_shardings=(state_shardings, parallel.replicated(mesh)),
      donate_argnums=0,
      compiler_options=compiler_options)


def check_batch_fits(batch_size: int, mesh) -> None:
  """The global batch must split evenly over the mesh's data axis; else a ValueError naming it."""
  devices = mesh.shape[parallel.DATA_AXIS]
  if batch_size % devices:
    raise ValueError(f"train.batch_size={batch_size} must be a multiple of the {devices} devices"
                     " of the mesh's data axis (all devices / train.model_parallelism).")


def create_state(exp, mesh, seed: int):
  """-> (the initial state, created directly in its shardings, and those shardings)."""
  rng = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(exp.init_state, rng)
  shardings = parallel.state_shardings(mesh, abstract)
  return jax.jit(exp.init_state, out_shardings=shardings)(rng), shardings


class GridSampler(NamedTuple):
  """The sampler of the training run's sample grids.

  `sample(ema_params, key)` -> float32 [padded_size, H, W, C], split over the
  mesh's data axis; the grid is its first `num_samples` images.
  """

  sample: Callable[[Any, jax.Array], jax.Array]
  num_samples: int


def make_grid_sampler(exp: experiment.Experiment, mesh) -> GridSampler:
  """The train.num_samples images of the sample grids, each device drawing its share.

  The batch is padded to a multiple of the mesh's data axis (the extra images
  are drawn and dropped). All noise is drawn at the padded shape from one key;
  under JAX's partitionable threefry the first num_samples images of such a
  draw do not depend on the padding, so a seed gives the same grid on any
  number of devices. A class-conditional model draws one class per row of the
  grid (`sampling.grid_labels`), guided with train.sample_guidance.
  """
  config = sampling.SamplerConfig(sampler=exp.train.sampler, steps=exp.train.sample_steps,
                                  guidance_scale=exp.train.sample_guidance)
  num_samples, num_classes = exp.train.num_samples, exp.num_classes
  padded_size = -(-num_samples // mesh.shape[parallel.DATA_AXIS]) * mesh.shape[parallel.DATA_AXIS]
  labels = None if num_classes is None else np.pad(
      sampling.grid_labels(num_samples, num_classes), (0, padded_size - num_samples))
  sample = jax.jit(sampling.make_batch_sampler(
      config, exp.apply_fn, exp.spec, exp.schedule, exp.image_shape, padded_size,
      num_classes=num_classes, labels=labels), out_shardings=parallel.batch_sharding(mesh),
      compiler_options=parallel.compiler_options(mesh))
  return GridSampler(sample, num_samples)


def write_samples(grid_sampler: GridSampler, state: TrainState, step: int, seed: int,
                  workdir: str, writer):
  """Samples from the EMA parameters into samples/step_<step>.png and TensorBoard.

  Every process calls it (the images are gathered from all devices); process 0 writes.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  sharded = grid_sampler.sample(state.ema_params, key)
  samples = images.to_uint8(
      multihost_utils.process_allgather(sharded, tiled=True)[:grid_sampler.num_samples])
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    images.save_image_grid(samples, path, min_size=GRID_MIN_SIZE)
    writer.write_images(step, {"samples": images.make_image_grid(samples)[None]})
    logging.info("Wrote %d samples to %s.", len(samples), path)


GRID_MIN_SIZE = 32  # pixels: smaller samples are enlarged in the PNG grids


def diffusion_hooks(exp: experiment.Experiment, mesh, workdir: str) -> list[Hook]:
  """A diffusion run's hooks: sample grids (train.sample_every) and their quality (eval_every)."""
  grid_sampler = make_grid_sampler(exp, mesh)
  seed = exp.config.seed + 1

  def sample(state, step, writer):
    write_samples(grid_sampler, state, step, seed, workdir, writer)

  hooks = [Hook("sample", exp.train.sample_every, sample)]
  if exp.train.eval_every:
    evaluator = periodic_eval.make_evaluator(exp, mesh, workdir)
    hooks.append(Hook("eval", exp.train.eval_every, lambda state, step, writer:
                      writer.write_scalars(step, evaluator(state.ema_params, step))))
  return hooks


def _finite(scalars: dict) -> dict:
  """The logged values but NaNs: the means of empty timestep quarters, or of skipped steps only."""
  return {k: v for k, v in scalars.items() if np.isfinite(v)}


def _raise_if_skipped(accumulated: TrainMetrics | None, latest_checkpoint: int | None) -> None:
  """train.on_nonfinite="stop": raises naming the first step skipped since the metrics were reset.

  Reads two device scalars: called at log steps and before saves only, so that
  no checkpoint is ever saved of a state past a non-finite step.
  """
  if accumulated is None:
    return
  skipped = jax.device_get(accumulated["skipped_steps"])
  if skipped.count:
    raise FloatingPointError(
        f"Non-finite loss, gradient or update at step {int(skipped.first)} ({int(skipped.count)} such"
        f" step(s) since the last log); stopping (train.on_nonfinite='stop'). The latest"
        f" checkpoint, step {latest_checkpoint}, is from before it; train.on_nonfinite='skip'"
        " skips such steps instead.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       model: nn.Module | None = None) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state.

  The config's `task` (`tasks.TASKS`: diffusion by default, or segmentation)
  builds the experiment; the loop is the same for both. `model`, an already
  built Flax module, replaces `config.model` (for diffusion one taking (x, t,
  y=None, train=False)). Sampling the run later (launch.sample) rebuilds the
  model from config.model: name a factory there ("package.module:factory") to
  make that possible.
  """
  exp = tasks.build(config, model)
  mesh = parallel.make_mesh(exp.train.model_parallelism)
  check_batch_fits(exp.train.batch_size, mesh)
  checkpoint.check_writable(workdir)
  checkpointer = checkpoint.Checkpointer(workdir, every_steps=exp.train.checkpoint_every,
                                         keep=exp.train.keep_checkpoints, delete_unfinished=True)
  config_changes = run_config.check_resume(config, workdir, checkpointer)  # before any write
  data_iterator = exp.make_train_iterator()
  state, shardings = create_state(exp, mesh, config.seed)
  state = checkpointer.restore(checkpoint.restore_target(state, shardings), data_iterator) or state
  initial_step = int(state.step)
  run_config.record_resume(config, workdir, config_changes, initial_step)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if initial_step == 0:
    parameter_overview.log_parameter_overview(state.params)
  logging.info("Training %s for %d steps from step %d on %d devices (%s).",
               type(exp.model).__name__, exp.train.num_steps, initial_step, jax.device_count(),
               dict(mesh.shape))
  step_fn = compile_train_step(exp, shardings, mesh)
  hooks = exp.periodic_hooks(mesh, workdir)
  batch_sharding = parallel.batch_sharding(mesh)
  progress = periodic_actions.ReportProgress(num_train_steps=exp.train.num_steps, writer=writer)
  accumulated = None
  stop_on_nonfinite = exp.train.on_nonfinite == "stop"
  with checkpoint.PreemptionNotice(initial_step) as preemption, contextlib.closing(checkpointer):
    for step in range(initial_step + 1, exp.train.num_steps + 1):
      batch = data.make_global_batch(next(data_iterator), batch_sharding)
      state, step_metrics = step_fn(state, batch)
      accumulated = merge_metrics(accumulated, step_metrics)
      progress(step)
      last = step == exp.train.num_steps
      if step % exp.train.log_every == 0 or last:
        scalars = compute_metrics(accumulated)  # the loop's host sync (and before saves)
        if stop_on_nonfinite:
          _raise_if_skipped(accumulated, checkpointer.latest_step())
        writer.write_scalars(step, _finite(scalars))
        accumulated = None
      for hook in hooks:
        if hook.due(step, last):
          with progress.timed(hook.name):
            hook.run(state, step, writer)
      stop = preemption.reached(step)
      if stop or last or checkpointer.is_due(step):
        if stop_on_nonfinite:
          _raise_if_skipped(accumulated, checkpointer.latest_step())
        checkpointer.save(step, state, data_iterator, force=True)
      if stop:
        logging.warning("Stop requested (SIGTERM): saved step %d and stopping.", step)
        break
  writer.flush()
  return state
