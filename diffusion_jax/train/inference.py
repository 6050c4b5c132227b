"""Loading a training run's EMA parameters for sampling and evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from diffusion_jax import parallel
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


def load_ema_for_sampling(workdir: str, step: int | None = None) -> EmaModel:
  """The EMA parameters of a run's latest checkpoint (or `step`), replicated over all devices.

  Reads only the EMA parameters and the step, never the optimizer state.

  Raises:
    FileNotFoundError: the workdir has no config.json or no checkpoint.
  """
  exp = experiment.build(checkpoint.load_config(workdir))
  checkpointer = checkpoint.Checkpointer(workdir, every_steps=1, keep=1 << 30)
  if checkpointer.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: train first.")
  # Shapes only: the initial state is never materialised, just used as the restore target.
  abstract = jax.eval_shape(exp.init_state, jax.random.PRNGKey(0))
  fields = {"ema_params": abstract.ema_params, "step": abstract.step}
  replicated = parallel.replicated(parallel.make_mesh())
  restored = checkpointer.restore_fields(
      checkpoint.restore_target(fields, jax.tree.map(lambda _: replicated, fields)), step=step)
  checkpointer.close()
  return EmaModel(exp.apply_fn, restored["ema_params"], exp.spec, exp.schedule, exp.image_shape,
                  exp.num_classes, int(restored["step"]))
