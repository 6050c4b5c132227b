"""Loading a training run's EMA parameters for sampling and evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from diffusion_jax import models, parallel, sampling
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.schedules import Schedule
from diffusion_jax.train import checkpoint, experiment

from diffusion_jax.sampling.generate import ApplyFn


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


def restore_ema(exp, workdir: str, step: int | None = None) -> tuple[Any, int]:
  """(EMA parameters replicated over all devices, step) of a run's latest checkpoint (or `step`).

  `exp` is the run's experiment (any task's: it needs `init_state`). Reads
  only the EMA parameters and the step, never the optimizer state.

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
  """
  # Closed on errors too: an open manager's threads fail noisily at exit.
  with contextlib.closing(checkpoint.Checkpointer(workdir, every_steps=1,
                                                  keep=1 << 30)) as checkpointer:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: train first.")
    # Shapes only: the initial state is never materialised, just used as the restore target.
    abstract = jax.eval_shape(exp.init_state, jax.random.PRNGKey(0))
    fields = {"ema_params": abstract.ema_params, "step": abstract.step}
    replicated = parallel.replicated(parallel.make_mesh())
    restored = checkpointer.restore_fields(
        checkpoint.restore_target(fields, jax.tree.map(lambda _: replicated, fields)), step=step)
  return restored["ema_params"], int(restored["step"])


def load_run_config(workdir: str, *, trust_model_code: bool = False) -> ml_collections.ConfigDict:
  """The config.json of the run in `workdir`, to build its model from.

  A workdir may come from anyone: a model factory ("package.module:factory")
  that its config names is code, and is refused unless `trust_model_code`.

  Raises:
    FileNotFoundError: the workdir has no config.json.
    models.UntrustedModelCodeError: it names a factory and trust_model_code is False.
  """
  config = checkpoint.load_config(workdir)
  models.check_trusted(config.get("model", {}), trust_model_code,
                       os.path.join(workdir, checkpoint.CONFIG_FILE))
  return config


def load_ema_for_sampling(workdir: str, step: int | None = None, *,
                          trust_model_code: bool = False) -> EmaModel:
  """The EMA parameters of a run's latest checkpoint (or `step`), replicated over all devices.

  Reads only the EMA parameters and the step, never the optimizer state. A
  model factory named in the workdir's config.json is imported only with
  `trust_model_code` (see `load_run_config`).

  Raises:
    FileNotFoundError: the workdir has no config.json or no checkpoint.
    ValueError: the workdir holds another task's run (segmentation), or names
      an untrusted model factory.
  """
  config = load_run_config(workdir, trust_model_code=trust_model_code)
  if config.get("task", "diffusion") != "diffusion":
    raise ValueError(f"{workdir} holds a {config.task} run, not a diffusion model to sample.")
  exp = experiment.build(config)
  params, step = restore_ema(exp, workdir, step)
  return EmaModel(exp.apply_fn, params, exp.spec, exp.schedule, exp.image_shape,
                  exp.num_classes, step)


def draw_samples(model: EmaModel, config: sampling.SamplerConfig, num_samples: int,
                 batch_size: int, out_dir: str, *, seed: int,
                 settings: Mapping[str, Any] | None = None, overwrite: bool = False) -> np.ndarray:
  """`sampling.sample_to_files` of `model`: resumable, every batch split over all devices.

  Batch b is drawn with fold_in(key(seed), b) on the devices of every process
  (call it from all of them), so one host or many give the same uint8
  [num_samples, H, W, C], returned on every process. batch_size must be a
  multiple of jax.device_count(). The saved settings are the checkpoint step,
  `config`'s fields and `settings`; `overwrite` lets a new run replace files
  that another left in `out_dir`.
  """
  mesh = parallel.make_mesh()
  if batch_size % mesh.size:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the {mesh.size} devices.")
  sample_batch = jax.jit(
      sampling.make_batch_sampler(config, model.apply_fn, model.spec, model.schedule,
                                  model.image_shape, batch_size, num_classes=model.num_classes),
      out_shardings=parallel.batch_sharding(mesh), compiler_options=parallel.compiler_options(mesh))
  return sampling.sample_to_files(
      functools.partial(sample_batch, model.params), num_samples, batch_size, out_dir,
      key=jax.random.key(seed),
      settings={**(settings or {}), "checkpoint_step": model.step, **dataclasses.asdict(config)},
      overwrite=overwrite)
