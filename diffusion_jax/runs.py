"""A training run read back from its workdir: its config, its EMA parameters, samples from them.

    model = runs.load_ema_for_sampling(workdir)          # EmaModel at the latest checkpoint
    runs.draw_samples(model, sampling.SamplerConfig(), 64, 64, out_dir, seed=0)

What launch.sample, evaluation, conversion and segmentation inference share.
The model is rebuilt from config.json with core parts only (the zoo, the
diffusion process), never through a task or the training loop; only the EMA
parameters and the step are read from the checkpoint, never the optimizer
state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import checkpoint, models, parallel, perf, process, sampling
from diffusion_jax.config.data import DataConfig
from diffusion_jax.config.diffusion import DiffusionConfig, DiffusionTrainConfig
from diffusion_jax.config.distill import ProgressiveConfig
from diffusion_jax.config.train import TrainConfig
from diffusion_jax.configlib import from_mapping
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.sampling.generate import ApplyFn
from diffusion_jax.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class EmaModel:
  """A run's EMA parameters at one checkpoint, with what sampling from them needs."""

  apply_fn: ApplyFn
  params: Any
  spec: ModelSpec
  schedule: Schedule
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_classes: int | None
  step: int  # the training step of the checkpoint
  dtype: Any = jnp.float32  # the network's compute dtype (for the peak FLOP/s of its MFU)


def example_inputs(model: nn.Module, image_shape: tuple[int, int, int]):
  """(x [1, H, W, C], t [1], y [1] or None): the inputs a diffusion model's `init` traces with."""
  conditional = getattr(model, "num_classes", None) is not None
  return (
    jnp.zeros((1, *image_shape), jnp.float32),
    jnp.zeros((1,), jnp.int32),
    jnp.zeros((1,), jnp.int32) if conditional else None,
  )


def diffusion_apply_fn(model: nn.Module, diffusion: DiffusionConfig) -> ApplyFn:
  """(params, x_t [B, H, W, C], t [B], y [B] | None) -> the network's output, as samplers call it.

  The network is fed `process.network_timesteps(diffusion, t)`, as in training;
  keyword arguments (train, rngs) go to model.apply.
  """

  def apply_fn(params, x_t, t, y=None, **kwargs):
    return model.apply(
      {"params": params}, x_t, process.network_timesteps(diffusion, t), y, **kwargs
    )

  return apply_fn


def image_shape(data: DataConfig) -> tuple[int, int, int]:
  """(H, W, C) of the images a run's `data` section prepares."""
  return (data.image_size, data.image_size, data.num_channels)


def ema_model(
  config: ml_collections.ConfigDict, params: Any, step: int, model: nn.Module | None = None
) -> EmaModel:
  """The EmaModel of a diffusion run's `config` with parameters `params` at `step`.

  `model`, when given, replaces building `config.model` with the zoo.
  """
  diffusion = from_mapping(DiffusionConfig, config.diffusion, "diffusion")
  model = models.get_model(dict(config.model)) if model is None else model
  return EmaModel(
    diffusion_apply_fn(model, diffusion),
    params,
    process.model_spec(diffusion),
    process.schedule(diffusion),
    image_shape(DataConfig.from_mapping(config.data)),
    getattr(model, "num_classes", None),
    step,
    jnp.dtype(getattr(model, "dtype", jnp.float32)),
  )


def restore_ema(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """(EMA parameters replicated over all devices, step) of a run's latest checkpoint (or `step`).

  `abstract_params` is the parameter tree's shapes (`jax.eval_shape` of the
  model's init, any task's). Reads only the EMA parameters and the step, never
  the optimizer state.

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
  """
  # Closed on errors too: an open manager's threads fail noisily at exit.
  with contextlib.closing(
    checkpoint.Checkpointer(workdir, every_steps=1, keep=1 << 30)
  ) as checkpointer:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: train first.")
    fields = {"ema_params": abstract_params, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    replicated = parallel.replicated(parallel.make_mesh())
    restored = checkpointer.restore_fields(
      checkpoint.restore_target(fields, jax.tree.map(lambda _: replicated, fields)), step=step
    )
  return restored["ema_params"], int(restored["step"])


# The train.* keys that today's segmentation section no longer has: a segmentation run's
# config.json written before the task-neutral TrainConfig holds them at their defaults.
_DIFFUSION_ONLY_TRAIN_KEYS = frozenset(
  f.name for f in dataclasses.fields(DiffusionTrainConfig)
) - frozenset(f.name for f in dataclasses.fields(TrainConfig))


def load_run_config(workdir: str, *, trust_model_code: bool = False) -> ml_collections.ConfigDict:
  """The config.json of the run in `workdir`, to build its model from.

  A workdir may come from anyone: a model factory ("package.module:factory")
  that its config names is code, and is refused unless `trust_model_code`. A
  segmentation run's config from before the task-neutral `train` section has
  the diffusion-only train keys dropped.

  Raises:
    FileNotFoundError: the workdir has no config.json.
    models.UntrustedModelCodeError: it names a factory and trust_model_code is False.
  """
  config = checkpoint.load_config(workdir)
  models.check_trusted(
    config.get("model", {}), trust_model_code, os.path.join(workdir, checkpoint.CONFIG_FILE)
  )
  if config.get("task") == "segmentation" and "train" in config:
    config.train = {
      key: value for key, value in config.train.items() if key not in _DIFFUSION_ONLY_TRAIN_KEYS
    }
  return config


SAMPLED_TASKS = ("diffusion", "progressive", "consistency")  # tasks whose runs are diffusion models


def load_ema_for_sampling(
  workdir: str, step: int | None = None, *, trust_model_code: bool = False
) -> EmaModel:
  """The EMA parameters of a run's latest checkpoint (or `step`), replicated over all devices.

  Reads only the EMA parameters and the step, never the optimizer state. A
  model factory named in the workdir's config.json is imported only with
  `trust_model_code` (see `load_run_config`). A run of a few-step task
  (SAMPLED_TASKS) is a diffusion model too: a progressive distillation
  student comes back as the K-step model of its checkpoint's round (`on_grid`).

  Raises:
    FileNotFoundError: the workdir has no config.json or no checkpoint.
    ValueError: the workdir holds another task's run (segmentation), or names
      an untrusted model factory.
  """
  config = load_run_config(workdir, trust_model_code=trust_model_code)
  task = config.get("task", "diffusion")
  if task not in SAMPLED_TASKS:
    raise ValueError(f"{workdir} holds a {task} run, not a diffusion model to sample.")
  model = models.get_model(dict(config.model))
  inputs = example_inputs(model, image_shape(DataConfig.from_mapping(config.data)))
  abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
  params, step = restore_ema(workdir, abstract, step)
  loaded = ema_model(config, params, step, model)
  if task == "progressive":
    distill = from_mapping(ProgressiveConfig, config.distill, "distill")
    return on_grid(loaded, f"trailing{distill.student_steps(step)}")
  return loaded


def on_grid(model: EmaModel, timesteps: str) -> EmaModel:
  """`model` as a diffusion model of the K steps `timesteps` names (a `schedules.respace` spec).

  A progressive distillation student was trained on the K-step grid of its
  checkpoint's round ("trailingK"): as a K-step model, `--sampler=ddim
  --steps=K` (or all its steps) visits exactly that grid.
  """
  steps = sampling.respaced(model.schedule, timesteps)
  apply_fn = model.apply_fn

  def apply_on_grid(params, x_t, t, y=None):
    return apply_fn(params, x_t, steps.timesteps[t], y)

  return dataclasses.replace(model, apply_fn=apply_on_grid, schedule=steps.schedule)


def draw_samples(
  model: EmaModel,
  config: sampling.SamplerConfig,
  num_samples: int,
  batch_size: int,
  out_dir: str,
  *,
  seed: int,
  settings: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> np.ndarray:
  """`sampling.sample_to_files` of `model`: resumable, every batch split over all devices.

  Batch b is drawn with fold_in(key(seed), b) on the devices of every process
  (call it from all of them), so one host or many give the same uint8
  [num_samples, H, W, C], returned on every process. batch_size must be a
  multiple of jax.device_count(). The saved settings are the checkpoint step,
  `config`'s fields and `settings`; `overwrite` lets a new run replace files
  that another left in `out_dir`. Logs images/s, TFLOP/s per device and MFU
  of the batches drawn (writing them included).
  """
  mesh = parallel.make_mesh()
  if batch_size % mesh.size:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the {mesh.size} devices.")
  sample_batch = jax.jit(
    sampling.make_batch_sampler(
      config,
      model.apply_fn,
      model.spec,
      model.schedule,
      model.image_shape,
      batch_size,
      num_classes=model.num_classes,
    ),
    out_shardings=parallel.batch_sharding(mesh),
    compiler_options=parallel.compiler_options(mesh),
  )
  compiled, meter, batches = None, None, 0

  def draw(key):  # compiles at the first batch left to draw: not at all when none is
    nonlocal compiled, meter, batches
    if compiled is None:
      compiled = sample_batch.lower(model.params, key).compile()
      flops = forward_flops(model, batch_size, mesh.size) * config.nfe(model.schedule.num_timesteps)
      meter = perf.Meter(
        flops, batch_size, perf.peak_flops(jax.devices()[0].device_kind, model.dtype), last_step=0
      )
    batches += 1
    return compiled(model.params, key)

  samples = sampling.sample_to_files(
    draw,
    num_samples,
    batch_size,
    out_dir,
    key=jax.random.key(seed),
    settings={**(settings or {}), "checkpoint_step": model.step, **dataclasses.asdict(config)},
    overwrite=overwrite,
  )
  if meter is not None:
    logging.info("Sampled %d batches: %s.", batches, perf.format_rates(meter.read(batches)))
  return samples


def forward_flops(model: EmaModel, batch_size: int, num_devices: int) -> float:
  """FLOPs per device of one network call on `batch_size` images (XLA's count, lowered).

  A sampler's loop is counted as this times its network calls (`perf`: XLA
  counts a loop's body once).
  """
  x = jax.ShapeDtypeStruct((batch_size, *model.image_shape), jnp.float32)
  # The samplers' call: int32 timesteps for a discrete-time model, float sigma for EDM's.
  t = jax.ShapeDtypeStruct((batch_size,), jnp.int32 if model.spec.edm is None else jnp.float32)
  y = None if model.num_classes is None else jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  return perf.lowered_flops(jax.jit(model.apply_fn).lower(model.params, x, t, y), num_devices)
