"""Turns an experiment's ConfigDict into the typed objects a run is made of.

Each room gets its own small config: `DiffusionConfig` for the diffusion
maths, `TrainConfig` for the loop, `OptimConfig` for optax, `DataConfig` for
the input pipeline; the model section goes to the zoo.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import configlib, edm, losses, models, sampling, schedules
from diffusion_jax.configlib import from_mapping
from diffusion_jax.data.config import DataConfig
from diffusion_jax.diffusion import ModelSpec, parse_enum
from diffusion_jax.train import optimizer
from diffusion_jax.train.step import StepFns, TrainState, train_step


LOSS_WEIGHTINGS = ("none", "min_snr")
PARAMETERIZATIONS = ("ddpm", "edm")
NONFINITE_ACTIONS = ("stop", "skip")  # train.on_nonfinite


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
  """The process and its parameterisation (Ho et al. 2020; Improved DDPM)."""

  schedule: str = "linear"  # beta schedule name, see schedules.BETA_SCHEDULES
  num_timesteps: int = 1000  # T
  mean_type: str = "epsilon"  # what the network predicts: epsilon, x0 or v
  var_type: str = "fixed_large"  # fixed_small, fixed_large, learned, learned_range
  loss: str = "simple"  # simple, hybrid or vlb
  timestep_sampler: str = "uniform"  # uniform or loss_aware (Improved DDPM sec. 3.3)
  clip_x0: bool = True  # clip predicted x_0 to [-1, 1] when sampling
  rescale_timesteps: bool = False  # feed the network t * 1000 / T (Improved DDPM's code)
  loss_weighting: str = "none"  # "none", or "min_snr": Hang et al. 2023 (docs/training.md)
  min_snr_gamma: float = 5.0  # gamma of "min_snr", the paper's choice
  # "ddpm": the network reads discrete timesteps t (mean_type, var_type, loss above); "edm":
  # Karras et al. 2022's preconditioning and loss (docs/training.md), the network fed
  # c_noise = ln(sigma) / 4; schedule and num_timesteps then only set the DDIM/DPM-Solver grid.
  parameterization: str = "ddpm"
  sigma_data: float = 0.5  # "edm": the data's standard deviation (EDM Table 1)
  p_mean: float = -1.2  # "edm": training ln(sigma) ~ N(p_mean, p_std^2) (EDM Table 1)
  p_std: float = 1.2

  def __post_init__(self):
    configlib.check_ranges(self, "diffusion", {"num_timesteps": configlib.AT_LEAST_ONE,
                                               "min_snr_gamma": configlib.POSITIVE,
                                               "sigma_data": configlib.POSITIVE,
                                               "p_mean": configlib.Range(),
                                               "p_std": configlib.POSITIVE})
    loss = parse_enum(losses.LossType, self.loss, "diffusion.loss")
    if self.parameterization not in PARAMETERIZATIONS:
      raise ValueError(f"Unknown diffusion.parameterization {self.parameterization!r}; known:"
                       f" {list(PARAMETERIZATIONS)}.")
    self.spec  # checks mean_type and var_type, and the EDM settings
    if self.parameterization == "edm":
      self._check_edm_fits()
    if self.loss_weighting not in LOSS_WEIGHTINGS:
      raise ValueError(f"Unknown diffusion.loss_weighting {self.loss_weighting!r}; known:"
                       f" {list(LOSS_WEIGHTINGS)}.")
    if self.loss_weighting == "min_snr" and loss is losses.LossType.VLB:
      raise ValueError("diffusion.loss_weighting 'min_snr' weights the MSE, which diffusion.loss"
                       " 'vlb' does not use.")
    for key, known in (("schedule", schedules.BETA_SCHEDULES),
                       ("timestep_sampler", losses.TIMESTEP_SAMPLERS)):
      if getattr(self, key) not in known:
        raise ValueError(f"Unknown diffusion.{key} {getattr(self, key)!r}; known: {sorted(known)}.")

  def _check_edm_fits(self) -> None:
    """The DDPM settings EDM's loss and preconditioning replace must stay at their defaults."""
    replaced = {"mean_type": "epsilon", "loss": "simple", "timestep_sampler": "uniform",
                "loss_weighting": "none", "rescale_timesteps": False}
    for key, default in replaced.items():
      if getattr(self, key) != default:
        raise ValueError(f"diffusion.{key}={getattr(self, key)!r} does not apply with"
                         f" diffusion.parameterization='edm' (EDM's network outputs F of its eq. 7"
                         f" and trains with its own loss); leave it at {default!r}.")
    if self.spec.learns_variance:
      raise ValueError(f"diffusion.var_type={self.var_type!r}: an EDM network predicts no"
                       " variance; use 'fixed_small' or 'fixed_large' (the DDPM sampler's).")

  @property
  def spec(self) -> ModelSpec:
    precond = None
    if self.parameterization == "edm":
      precond = edm.Preconditioning(self.sigma_data, self.p_mean, self.p_std)
    return ModelSpec(self.mean_type, self.var_type, self.clip_x0, edm=precond)

  @property
  def snr_gamma(self) -> float | None:
    """The gamma of min-SNR weighting, or None without it (losses.training_losses' argument)."""
    return self.min_snr_gamma if self.loss_weighting == "min_snr" else None

  def network_timesteps(self, t: jax.Array) -> jax.Array:
    """The timesteps the network sees for diffusion timesteps t [B].

    t itself, or t * 1000 / T as float32 with `rescale_timesteps`: the
    improved-diffusion code feeds its network timesteps on DDPM's [0, 1000)
    scale whatever T is, so a network trained there needs them.
    """
    if not self.rescale_timesteps:
      return t
    return jnp.asarray(t, jnp.float32) * (1000.0 / self.num_timesteps)


DEFAULT_LABEL_DROPOUT = 0.1  # p_uncond; Ho & Salimans 2022 find 0.1 or 0.2 best

TRAIN_RANGES = {  # TrainConfig's numeric fields and the values each accepts
    **dict.fromkeys(("batch_size", "num_steps", "log_every", "checkpoint_every",
                     "keep_checkpoints", "num_samples", "sample_steps", "model_parallelism",
                     "eval_num_samples", "grad_accum_steps"), configlib.AT_LEAST_ONE),
    "eval_every": configlib.NON_NEGATIVE, "ema_decay": configlib.DECAY,
    "label_dropout": configlib.DECAY, "sample_guidance": configlib.NON_NEGATIVE}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """The loop: how long, how big, how often to log, sample and checkpoint."""

  batch_size: int = 128  # global, over all devices and hosts
  num_steps: int = 800_000
  ema_decay: float = 0.9999
  log_every: int = 100  # steps between metric writes (the only host syncs)
  checkpoint_every: int = 10_000
  keep_checkpoints: int = 3
  sample_every: int = 50_000  # steps between sample grids from the EMA params (0: only at end)
  num_samples: int = 64  # images in a sample grid
  sampler: str = "ddim"  # sampler of the grids: ddpm (ancestral), ddim or dpm_solver
  sample_steps: int = 100  # its number of steps
  sample_guidance: float = 0.0  # classifier-free guidance w of the grids (Ho & Salimans 2022)
  model_parallelism: int = 1  # size of the mesh's "model" axis (FSDP); 1 = data parallel
  eval_every: int = 0  # steps between sample-quality evaluations (train/periodic_eval.py); 0 = none
  eval_num_samples: int = 2000  # samples per evaluation: a biased but comparable curve
  eval_metric: str = "fid"  # "fid" (needs $DIFFUSION_JAX_INCEPTION_WEIGHTS) or "fd_digits"
  grad_accum_steps: int = 1  # microbatches per optimizer step (batch_size / k images each)
  # Classifier-free guidance's p_uncond (Ho & Salimans 2022): the probability of training a
  # label as the null label. None: DEFAULT_LABEL_DROPOUT for class-conditional models, else 0.
  label_dropout: float | None = None
  # A step with a non-finite loss or gradient never changes the state (train/step.py); "stop":
  # the run then raises naming that step, with no checkpoint saved after it; "skip": it goes on,
  # counting such steps in the metric skipped_steps. See docs/training.md.
  on_nonfinite: str = "stop"

  def __post_init__(self):
    configlib.check_ranges(self, "train", TRAIN_RANGES)
    if self.eval_metric not in ("fid", "fd_digits"):
      raise ValueError(f"Unknown train.eval_metric {self.eval_metric!r}; known: ['fid',"
                       " 'fd_digits'].")
    if self.sampler not in sampling.SAMPLERS:
      raise ValueError(f"Unknown train.sampler {self.sampler!r}; known: {sorted(sampling.SAMPLERS)}.")
    if self.batch_size % self.grad_accum_steps:
      raise ValueError(f"train.grad_accum_steps={self.grad_accum_steps} does not divide"
                       f" train.batch_size={self.batch_size}.")
    if self.on_nonfinite not in NONFINITE_ACTIONS:
      raise ValueError(f"Unknown train.on_nonfinite {self.on_nonfinite!r}; known:"
                       f" {list(NONFINITE_ACTIONS)}.")

  def p_uncond(self, class_conditional: bool) -> float:
    """label_dropout for a model that is class-conditional or not.

    Raises:
      ValueError: label_dropout or sample_guidance set for an unconditional model,
        or guided grids from a null label that label_dropout 0 leaves untrained.
    """
    if not class_conditional:
      for key in ("label_dropout", "sample_guidance"):
        if getattr(self, key):
          raise ValueError(f"train.{key}={getattr(self, key)} needs a class-conditional model"
                           " (model.num_classes); this one is unconditional.")
      return 0.0
    p_uncond = DEFAULT_LABEL_DROPOUT if self.label_dropout is None else self.label_dropout
    if self.sample_guidance and not p_uncond:
      raise ValueError(f"train.sample_guidance={self.sample_guidance} samples the null label,"
                       " which train.label_dropout=0 leaves untrained.")
    return p_uncond


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A config made concrete: model, process, optimizer, data and loop settings."""

  config: ml_collections.ConfigDict
  model: nn.Module
  diffusion: DiffusionConfig
  schedule: schedules.Schedule
  optim: optimizer.OptimConfig
  train: TrainConfig
  data: Any  # data.DataConfig
  image_shape: tuple[int, int, int]  # (H, W, C)

  @property
  def spec(self) -> ModelSpec:
    return self.diffusion.spec

  @property
  def num_classes(self) -> int | None:
    return getattr(self.model, "num_classes", None)

  def model_apply(self, params, x_t, t, y=None, **kwargs):
    """model.apply({"params": params}, x_t, t', y, **kwargs) on diffusion timesteps t [B].

    t' = diffusion.network_timesteps(t). Every call of the network goes through
    here (the train step, every sampler, the NLL), so rescale_timesteps holds for
    all of them. kwargs (train, rngs) go to model.apply.
    """
    return self.model.apply({"params": params}, x_t, self.diffusion.network_timesteps(t), y,
                            **kwargs)

  def apply_fn(self, params, x_t, t, y=None):
    """The model as samplers call it: (params, x_t [B, H, W, C], t [B], y [B] | None) -> output."""
    return self.model_apply(params, x_t, t, y)

  def step_fns(self) -> StepFns:
    tx, lr_schedule = optimizer.make_optimizer(self.optim)
    return StepFns(
        apply=self.model_apply, tx=tx, lr_schedule=lr_schedule, spec=self.spec,
        schedule=self.schedule,
        loss_type=losses.LossType(self.diffusion.loss),
        timestep_sampler=self._noise_level_sampler(),
        ema_decay=self.train.ema_decay,
        num_classes=self.num_classes,
        label_dropout=self.train.p_uncond(self.num_classes is not None),
        min_snr_gamma=self.diffusion.snr_gamma,
        grad_accum_steps=self.train.grad_accum_steps)

  def _noise_level_sampler(self):
    """Draws the training timesteps t [B] (DDPM) or noise levels sigma [B] (EDM)."""
    if self.spec.edm:
      return edm.LogNormalSigmas(self.spec.edm)
    return losses.get_timestep_sampler(self.diffusion.timestep_sampler,
                                       self.diffusion.num_timesteps)

  def train_step_fn(self):
    """The pure `(state, batch) -> (state, metrics)` the loop jits."""
    return functools.partial(train_step, fns=self.step_fns())

  def make_train_iterator(self):
    """The input pipeline's endless, checkpointable iterator of training batches."""
    from diffusion_jax import data  # the input pipeline pulls in TF; import it only when training

    return data.make_train_iterator(self.data, self.train.batch_size)

  def periodic_hooks(self, mesh, workdir: str):
    """The loop's periodic actions for this run (`loop.diffusion_hooks`)."""
    from diffusion_jax.train import loop  # the loop imports this module

    return loop.diffusion_hooks(self, mesh, workdir)

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh TrainState; jit it with out_shardings to create it sharded."""
    fns = self.step_fns()
    init_key, state_key = jax.random.split(rng)
    params = self.model.init(init_key, *_example_inputs(self.model, self.image_shape))["params"]
    return TrainState(step=jnp.array(0, jnp.int32), params=params, ema_params=params,
                      opt_state=fns.tx.init(params), rng=state_key,
                      sampler_state=fns.timestep_sampler.init())


SECTIONS = ("seed", "data", "model", "diffusion", "optim", "train")


def complete_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with every field its sections know: the file's values over the defaults.

  Each section holds all fields of its dataclass (`DataConfig`, the zoo entry's
  module, `DiffusionConfig`, `OptimConfig`, `TrainConfig`), so the command line
  can override any of them on any config. Config files end with it; it is
  idempotent, and a key no section knows, or a value out of its section's
  range (NaN, lr <= 0, ...), is a ValueError naming it.
  """
  configlib.check_known(config, SECTIONS, "config")
  if "model" not in config:
    raise ValueError("The config has no model section (config.model with a `name`).")
  complete = ml_collections.ConfigDict()
  complete.seed = config.get("seed", 0)
  complete.data = configlib.section(DataConfig, config.get("data"), name="data")
  complete.model = models.config_section(config.model)
  for name, cls in (("diffusion", DiffusionConfig), ("optim", optimizer.OptimConfig),
                    ("train", TrainConfig)):
    complete[name] = configlib.section(cls, config.get(name), name=name)
    from_mapping(cls, complete[name], name)  # checks its values; `build` again after overrides
  return complete


def build(config: ml_collections.ConfigDict, model: nn.Module | None = None) -> Experiment:
  """Checks the config and builds its parts; every bad value is named in the error.

  `model`, when given, is used instead of building `config.model` with the zoo.
  """
  from diffusion_jax import data  # the input pipeline pulls in TF; import it only when training

  configlib.check_known(config, SECTIONS, "config")
  diffusion_config = from_mapping(DiffusionConfig, config.diffusion, "diffusion")
  data_config = data.DataConfig.from_mapping(config.data)
  image_shape = (data_config.image_size, data_config.image_size, data_config.num_channels)
  spec = diffusion_config.spec
  model = models.get_model(dict(config.model)) if model is None else model
  _check_model_output(model, spec, image_shape)
  train_config = from_mapping(TrainConfig, config.train, "train")
  train_config.p_uncond(getattr(model, "num_classes", None) is not None)  # checks it fits
  return Experiment(
      config=config, model=model, diffusion=diffusion_config,
      schedule=schedules.get_schedule(diffusion_config.schedule, diffusion_config.num_timesteps),
      optim=optimizer.OptimConfig.from_mapping(config.optim), train=train_config,
      data=data_config, image_shape=image_shape)


def _example_inputs(model: nn.Module, image_shape):
  """(x [1, H, W, C], t [1], y [1] or None): the inputs `model.init` traces with."""
  conditional = getattr(model, "num_classes", None) is not None
  return (jnp.zeros((1, *image_shape), jnp.float32), jnp.zeros((1,), jnp.int32),
          jnp.zeros((1,), jnp.int32) if conditional else None)


def _check_model_output(model: nn.Module, spec: ModelSpec, image_shape) -> None:
  """The model must output the channels the parameterisation reads, at the data's size."""
  args = _example_inputs(model, image_shape)
  try:
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *args)[0])
  except Exception as e:
    raise ValueError(f"Model {type(model).__name__} cannot take images of shape {image_shape}:"
                     f" {e}") from e
  expected = (1, *image_shape[:2], spec.output_channels(image_shape[2]))
  if out.shape != expected:
    raise ValueError(
        f"The model outputs {out.shape[1:]} but var_type {spec.var_type.value!r} on"
        f" {image_shape} images needs {expected[1:]}: set model.learn_sigma"
        f" = {spec.learns_variance}.")
