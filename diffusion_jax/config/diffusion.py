"""The diffusion task's sections: `diffusion` (the process), `train` (the loop plus grids, FID,
label dropout), and `complete_config`, which every diffusion config file ends with.

The names each setting accepts are listed here (BETA_SCHEDULES, SAMPLERS,
...) so that a config is checked without importing JAX; tests/test_configs.py
checks that they are the names of the registries that build them
(schedules.BETA_SCHEDULES, sampling.SAMPLERS, ...).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from diffusion_jax import configlib
from diffusion_jax.config import models
from diffusion_jax.config.data import DataConfig
from diffusion_jax.config.optim import OptimConfig
from diffusion_jax.config.sampler import SAMPLERS
from diffusion_jax.config.train import TrainConfig

BETA_SCHEDULES = ("cosine", "linear", "quadratic", "sigmoid")  # schedules.BETA_SCHEDULES
MEAN_TYPES = ("epsilon", "x0", "v")  # diffusion.MeanType
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")  # diffusion.VarType
LOSSES = ("simple", "hybrid", "vlb")  # losses.LossType
TIMESTEP_SAMPLERS = ("loss_aware", "uniform")  # losses.TIMESTEP_SAMPLERS
LOSS_WEIGHTINGS = ("none", "min_snr")
PARAMETERIZATIONS = ("ddpm", "edm", "consistency")
EVAL_METRICS = ("fid", "fd_digits")  # train.eval_metric
DEFAULT_LABEL_DROPOUT = 0.1  # p_uncond; Ho & Salimans 2022 find 0.1 or 0.2 best


def check_name(value: str, known: tuple[str, ...], key: str) -> None:
  """A ValueError naming `key`, `value` and the `known` names when value is not one of them."""
  if value not in known:
    raise ValueError(f"Unknown {key} {value!r}; known: {list(known)}.")


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
  # "consistency": EDM's network as a consistency function f (consistency.py), trained by the
  # task "consistency" (docs/distillation.md), sampled by the "consistency" sampler.
  parameterization: str = "ddpm"
  sigma_data: float = 0.5  # "edm": the data's standard deviation (EDM Table 1)
  p_mean: float = -1.2  # "edm": training ln(sigma) ~ N(p_mean, p_std^2) (EDM Table 1)
  p_std: float = 1.2

  def __post_init__(self):
    configlib.check_ranges(
      self,
      "diffusion",
      {
        "num_timesteps": configlib.AT_LEAST_ONE,
        "min_snr_gamma": configlib.POSITIVE,
        "sigma_data": configlib.POSITIVE,
        "p_mean": configlib.Range(),
        "p_std": configlib.POSITIVE,
      },
    )
    for key, known in (
      ("loss", LOSSES),
      ("parameterization", PARAMETERIZATIONS),
      ("mean_type", MEAN_TYPES),
      ("var_type", VAR_TYPES),
    ):
      check_name(getattr(self, key), known, f"diffusion.{key}")
    if self.parameterization != "ddpm":
      self._check_edm_fits()
    check_name(self.loss_weighting, LOSS_WEIGHTINGS, "diffusion.loss_weighting")
    if self.loss_weighting == "min_snr" and self.loss == "vlb":
      raise ValueError(
        "diffusion.loss_weighting 'min_snr' weights the MSE, which diffusion.loss"
        " 'vlb' does not use."
      )
    for key, known in (("schedule", BETA_SCHEDULES), ("timestep_sampler", TIMESTEP_SAMPLERS)):
      check_name(getattr(self, key), known, f"diffusion.{key}")

  def _check_edm_fits(self) -> None:
    """The DDPM settings EDM's loss and preconditioning replace must stay at their defaults."""
    replaced = {
      "mean_type": "epsilon",
      "loss": "simple",
      "timestep_sampler": "uniform",
      "loss_weighting": "none",
      "rescale_timesteps": False,
    }
    for key, default in replaced.items():
      if getattr(self, key) != default:
        raise ValueError(
          f"diffusion.{key}={getattr(self, key)!r} does not apply with"
          f" diffusion.parameterization='edm' (EDM's network outputs F of its eq. 7"
          f" and trains with its own loss); leave it at {default!r}."
        )
    if self.learns_variance:
      raise ValueError(
        f"diffusion.var_type={self.var_type!r}: an EDM network predicts no"
        " variance; use 'fixed_small' or 'fixed_large' (the DDPM sampler's)."
      )

  @property
  def learns_variance(self) -> bool:
    """Whether the network also outputs the variance (var_type learned or learned_range)."""
    return self.var_type in ("learned", "learned_range")

  @property
  def snr_gamma(self) -> float | None:
    """The gamma of min-SNR weighting, or None without it (losses.training_losses' argument)."""
    return self.min_snr_gamma if self.loss_weighting == "min_snr" else None


DIFFUSION_TRAIN_RANGES = {  # DiffusionTrainConfig's own numeric fields and the values each accepts
  **dict.fromkeys(("num_samples", "sample_steps", "eval_num_samples"), configlib.AT_LEAST_ONE),
  "label_dropout": configlib.DECAY,
  "sample_guidance": configlib.NON_NEGATIVE,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionTrainConfig(TrainConfig):
  """A diffusion run's `train` section: the loop's fields, its sample grids and periodic FID."""

  sample_every: int = 50_000  # steps between sample grids from the EMA params (0: only at end)
  num_samples: int = 64  # images in a sample grid
  sampler: str = "ddim"  # sampler of the grids: ddpm (ancestral), ddim or dpm_solver
  sample_steps: int = 100  # its number of steps
  sample_guidance: float = 0.0  # classifier-free guidance w of the grids (Ho & Salimans 2022)
  # Every eval_every steps (train/periodic_eval.py): eval_num_samples samples, one metric.
  eval_num_samples: int = 2000  # samples per evaluation: a biased but comparable curve
  eval_metric: str = "fid"  # "fid" (needs $DIFFUSION_JAX_INCEPTION_WEIGHTS) or "fd_digits"
  # Classifier-free guidance's p_uncond (Ho & Salimans 2022): the probability of training a
  # label as the null label. None: DEFAULT_LABEL_DROPOUT for class-conditional models, else 0.
  label_dropout: float | None = None

  def __post_init__(self):
    super().__post_init__()
    configlib.check_ranges(self, "train", DIFFUSION_TRAIN_RANGES)
    check_name(self.eval_metric, EVAL_METRICS, "train.eval_metric")
    check_name(self.sampler, SAMPLERS, "train.sampler")

  def p_uncond(self, class_conditional: bool) -> float:
    """label_dropout for a model that is class-conditional or not.

    Raises:
      ValueError: label_dropout or sample_guidance set for an unconditional model,
        or guided grids from a null label that label_dropout 0 leaves untrained.
    """
    if not class_conditional:
      for key in ("label_dropout", "sample_guidance"):
        if getattr(self, key):
          raise ValueError(
            f"train.{key}={getattr(self, key)} needs a class-conditional model"
            " (model.num_classes); this one is unconditional."
          )
      return 0.0
    p_uncond = DEFAULT_LABEL_DROPOUT if self.label_dropout is None else self.label_dropout
    if self.sample_guidance and not p_uncond:
      raise ValueError(
        f"train.sample_guidance={self.sample_guidance} samples the null label,"
        " which train.label_dropout=0 leaves untrained."
      )
    return p_uncond


SECTIONS = ("seed", "data", "model", "diffusion", "optim", "train")
# The dataclass of each section but the model's (config.models) and the seed.
SECTION_CLASSES = {
  "data": DataConfig,
  "diffusion": DiffusionConfig,
  "optim": OptimConfig,
  "train": DiffusionTrainConfig,
}


def complete_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with every field its sections know: the file's values over the defaults.

  Each section holds all fields of its dataclass (`SECTION_CLASSES`, the zoo
  entry's architecture for `model`), so the command line can override any of
  them on any config. Config files end with it; it is idempotent, and a key no
  section knows, or a value out of its section's range (NaN, lr <= 0, ...),
  is a ValueError naming it.
  """
  configlib.check_known(config, SECTIONS, "config")
  if "model" not in config:
    raise ValueError("The config has no model section (config.model with a `name`).")
  complete = ml_collections.ConfigDict()
  complete.seed = config.get("seed", 0)
  complete.data = configlib.section(DataConfig, config.get("data"), name="data")
  complete.model = models.model_section(config.model)
  for name in ("diffusion", "optim", "train"):
    cls = SECTION_CLASSES[name]
    complete[name] = configlib.section(cls, config.get(name), name=name)
    configlib.from_mapping(
      cls, complete[name], name
    )  # checks its values; build again after overrides
  return complete
