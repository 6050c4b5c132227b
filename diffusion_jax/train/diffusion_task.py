"""The diffusion task: a config made concrete into the model, process, optimizer, data and step.

Each room gets its own small config (diffusion_jax/config/): `DiffusionConfig`
for the diffusion maths, `DiffusionTrainConfig` for the loop and its grids,
`OptimConfig` for optax, `DataConfig` for the input pipeline; the model
section goes to the zoo.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import configlib, data, edm, losses, models, process, runs, schedules
from diffusion_jax.config.data import DataConfig
from diffusion_jax.config.diffusion import SECTIONS, DiffusionConfig, DiffusionTrainConfig
from diffusion_jax.config.optim import OptimConfig
from diffusion_jax.configlib import from_mapping
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.train import optimizer, sample_grids
from diffusion_jax.train.run_config import FIXED_BY_CHECKPOINT, FIXED_BY_RUN
from diffusion_jax.train.diffusion_step import StepFns, train_step
from diffusion_jax.train.state import TrainState
from diffusion_jax.train.task import Hook


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A config made concrete: model, process, optimizer, data and loop settings."""

  config: ml_collections.ConfigDict
  model: nn.Module
  diffusion: DiffusionConfig
  schedule: schedules.Schedule
  optim: OptimConfig
  train: DiffusionTrainConfig
  data: DataConfig
  image_shape: tuple[int, int, int]  # (H, W, C)

  resume_rules: ClassVar[Mapping[str, str]] = {  # this task's rows of run_config's rules
    "diffusion": FIXED_BY_CHECKPOINT,  # the process the network reverses, its loss and sampler
    "train.label_dropout": FIXED_BY_RUN,  # how often the null label is trained
  }

  @property
  def spec(self) -> ModelSpec:
    return process.model_spec(self.diffusion)

  @property
  def num_classes(self) -> int | None:
    return getattr(self.model, "num_classes", None)

  def model_apply(self, params, x_t, t, y=None, **kwargs):
    """model.apply({"params": params}, x_t, t', y, **kwargs) on diffusion timesteps t [B].

    t' = process.network_timesteps(diffusion, t). Every call of the network goes through
    here (the train step, every sampler, the NLL), so rescale_timesteps holds for
    all of them. kwargs (train, rngs) go to model.apply.
    """
    return self.model.apply(
      {"params": params}, x_t, process.network_timesteps(self.diffusion, t), y, **kwargs
    )

  def apply_fn(self, params, x_t, t, y=None):
    """The model as samplers call it: (params, x_t [B, H, W, C], t [B], y [B] | None) -> output."""
    return self.model_apply(params, x_t, t, y)

  def step_fns(self) -> StepFns:
    tx, lr_schedule = optimizer.make_optimizer(self.optim)
    return StepFns(
      apply=self.model_apply,
      tx=tx,
      lr_schedule=lr_schedule,
      spec=self.spec,
      schedule=self.schedule,
      loss_type=losses.LossType(self.diffusion.loss),
      timestep_sampler=self._noise_level_sampler(),
      ema_decay=self.train.ema_decay,
      keep_last_finite=self.train.on_nonfinite == "skip",
      num_classes=self.num_classes,
      label_dropout=self.train.p_uncond(self.num_classes is not None),
      min_snr_gamma=self.diffusion.snr_gamma,
      grad_accum_steps=self.train.grad_accum_steps,
    )

  def _noise_level_sampler(self):
    """Draws the training timesteps t [B] (DDPM) or noise levels sigma [B] (EDM)."""
    if self.spec.edm:
      return edm.LogNormalSigmas(self.spec.edm)
    return losses.get_timestep_sampler(
      self.diffusion.timestep_sampler, self.diffusion.num_timesteps
    )

  def train_step_fn(self):
    """The pure `(state, batch) -> (state, metrics)` the loop jits."""
    return functools.partial(train_step, fns=self.step_fns())

  def counted_step_fn(self):
    """The step with one microbatch and no remat when either is set, else None (train/task.py)."""
    remat = getattr(self.model, "remat", False)
    if self.train.grad_accum_steps == 1 and not remat:
      return None
    return dataclasses.replace(
      self,
      model=self.model.clone(remat=False) if remat else self.model,
      train=dataclasses.replace(self.train, grad_accum_steps=1),
    ).train_step_fn()

  def make_train_iterator(self):
    """The input pipeline's endless, checkpointable iterator of training batches."""
    return data.make_train_iterator(self.data, self.train.batch_size)

  def periodic_hooks(self, mesh, workdir: str) -> list[Hook]:
    """Sample grids every train.sample_every steps, their quality every eval_every."""
    return sample_grids.periodic_hooks(self, mesh, workdir)

  def init_state(self, rng: jax.Array, params: Any = None) -> TrainState:
    """A fresh TrainState; jit it with out_shardings to create it sharded.

    `params` (a converted checkpoint's) replace the random initialisation.
    """
    fns = self.step_fns()
    init_key, state_key = jax.random.split(rng)
    if params is None:
      example = runs.example_inputs(self.model, self.image_shape)
      params = self.model.init(init_key, *example)["params"]
    return TrainState(
      step=jnp.array(0, jnp.int32),
      params=params,
      ema_params=params,
      opt_state=fns.tx.init(params),
      rng=state_key,
      sampler_state=fns.timestep_sampler.init(),
    )


def build(config: ml_collections.ConfigDict, model: nn.Module | None = None) -> Experiment:
  """Checks the config and builds its parts; every bad value is named in the error.

  `model`, when given, is used instead of building `config.model` with the zoo.
  """
  configlib.check_known(config, SECTIONS, "config")
  diffusion_config = from_mapping(DiffusionConfig, config.diffusion, "diffusion")
  if diffusion_config.parameterization == "consistency":
    raise ValueError(
      "diffusion.parameterization='consistency' is trained by config.task"
      " 'consistency' (docs/distillation.md), not by the diffusion task."
    )
  data_config = DataConfig.from_mapping(config.data)
  image_shape = runs.image_shape(data_config)
  spec = process.model_spec(diffusion_config)
  model = models.get_model(dict(config.model)) if model is None else model
  _check_model_output(model, spec, image_shape)
  train_config = from_mapping(DiffusionTrainConfig, config.train, "train")
  train_config.p_uncond(getattr(model, "num_classes", None) is not None)  # checks it fits
  return Experiment(
    config=config,
    model=model,
    diffusion=diffusion_config,
    schedule=process.schedule(diffusion_config),
    optim=OptimConfig.from_mapping(config.optim),
    train=train_config,
    data=data_config,
    image_shape=image_shape,
  )


def _check_model_output(model: nn.Module, spec: ModelSpec, image_shape) -> None:
  """The model must output the channels the parameterisation reads, at the data's size."""
  args = runs.example_inputs(model, image_shape)
  try:
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *args)[0])
  except Exception as e:
    raise ValueError(
      f"Model {type(model).__name__} cannot take images of shape {image_shape}: {e}"
    ) from e
  expected = (1, *image_shape[:2], spec.output_channels(image_shape[2]))
  if out.shape != expected:
    raise ValueError(
      f"The model outputs {out.shape[1:]} but var_type {spec.var_type.value!r} on"
      f" {image_shape} images needs {expected[1:]}: set model.learn_sigma"
      f" = {spec.learns_variance}."
    )
