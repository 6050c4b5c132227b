"""What the distillation tasks share: the student's sections, its batches, its first state.

Both tasks (progressive_task.py, consistency_task.py) train a student diffusion
model with the loop's plain `train` section, on the diffusion task's input
pipeline, without a microbatch loop; `StudentExperiment` holds those parts and
the `train.task.Task` methods they settle alike, `student_sections` the checks
and parsing that open both tasks' `build`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffusion_jax import configlib, data, models
from diffusion_jax.config.data import DataConfig
from diffusion_jax.config.diffusion import DiffusionConfig
from diffusion_jax.config.distill import SECTIONS
from diffusion_jax.config.optim import OptimConfig
from diffusion_jax.config.train import TrainConfig
from diffusion_jax.configlib import from_mapping
from diffusion_jax.train.run_config import FIXED_BY_CHECKPOINT
from diffusion_jax.train.state import TrainState
from diffusion_jax.train.task import Hook


@dataclasses.dataclass(frozen=True)
class StudentExperiment:
  """The sections of a distillation config made concrete; a task adds its `distill`, `teacher`."""

  config: ml_collections.ConfigDict
  model: nn.Module  # the student's network (the teacher's architecture, when there is one)
  diffusion: DiffusionConfig  # the student's process and parameterization
  optim: OptimConfig
  train: TrainConfig
  data: DataConfig

  resume_rules: ClassVar[Mapping[str, str]] = {  # the tasks' rows of run_config's rules
    "diffusion": FIXED_BY_CHECKPOINT,  # how the student's network is read
    "distill": FIXED_BY_CHECKPOINT,  # the teacher, the method and the state the task keeps
  }

  def counted_step_fn(self):
    """None: no microbatch loop, so XLA's count of the step is the MFU's (train/task.py); the
    teacher's network calls count, and with model.remat so do the recomputed passes."""
    return None

  def make_train_iterator(self):
    """The input pipeline's endless, checkpointable iterator of training batches."""
    return data.make_train_iterator(self.data, self.train.batch_size)

  def periodic_hooks(self, mesh, workdir: str) -> list[Hook]:
    """None: sample the student's checkpoints with launch.sample / launch.evaluate."""
    del mesh, workdir
    return []


def student_sections(
  config: ml_collections.ConfigDict, model: nn.Module | None, distill_class: type, training: str
) -> dict[str, Any]:
  """The fields of a `StudentExperiment`, and the `distill` section, parsed and checked.

  `distill_class` parses `config.distill`; `training` names the task in the
  error refusing gradient accumulation. `model`, when given, replaces building
  `config.model` with the zoo.
  """
  configlib.check_known(config, SECTIONS, "config")
  distill = from_mapping(distill_class, config.distill, "distill")
  train = from_mapping(TrainConfig, config.train, "train")
  if train.grad_accum_steps != 1:
    raise ValueError(
      f"train.grad_accum_steps must be 1 for {training}, got {train.grad_accum_steps}."
    )
  return dict(
    config=config,
    model=models.get_model(dict(config.model)) if model is None else model,
    diffusion=from_mapping(DiffusionConfig, config.diffusion, "diffusion"),
    optim=OptimConfig.from_mapping(config.optim),
    train=train,
    data=DataConfig.from_mapping(config.data),
    distill=distill,
  )


def initial_state(
  params, tx: optax.GradientTransformation, rng: jax.Array, task_state
) -> TrainState:
  """Step 0 of a student starting at `params`: its EMA too, a fresh optimizer, `task_state`."""
  return TrainState(
    step=jnp.array(0, jnp.int32),
    params=params,
    ema_params=params,
    opt_state=tx.init(params),
    rng=rng,
    sampler_state=task_state,
  )
