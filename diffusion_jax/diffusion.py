"""Pure functions of the forward process and of the model's reverse process.

Ho et al. 2020 ("DDPM") and Nichol & Dhariwal 2021 ("Improved DDPM"). Every
function takes a `Schedule` and arrays; `t` is an int [B] array of 0-based
timesteps; images are [B, ...] (NHWC for images, but any trailing shape works).
Nothing here knows about Flax: the model enters elsewhere as a plain callable
`model_fn(x_t, t) -> output`, and here only its output is interpreted.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule

if TYPE_CHECKING:
  from diffusion_jax.edm import Preconditioning


class MeanType(str, enum.Enum):
  """What the network predicts, from which the mean of p(x_{t-1} | x_t) follows."""

  EPSILON = "epsilon"  # the noise eps (Ho et al. eq. 11)
  X0 = "x0"  # the clean image x_0
  V = "v"  # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)


class VarType(str, enum.Enum):
  """How the variance of p(x_{t-1} | x_t) is chosen."""

  FIXED_SMALL = "fixed_small"  # posterior variance beta~_t (Ho et al. sec. 3.2)
  FIXED_LARGE = "fixed_large"  # beta_t (with beta~_1 at t=1, as Improved DDPM)
  LEARNED = "learned"  # the network outputs log sigma^2 directly
  LEARNED_RANGE = "learned_range"  # Improved DDPM eq. 15: log-interpolation by v


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to read a model output: mean and variance parameterisation, x_0 clipping.

  Hashable, so it can be a static argument of a jitted function. With `edm`
  set the network is EDM-preconditioned (Karras et al. 2022, eq. 7): it is
  called with (c_in x, c_noise) and outputs F, mean_type and var_type do not
  apply, and the discrete-time functions here must not read its output.
  """

  mean_type: MeanType = MeanType.EPSILON
  var_type: VarType = VarType.FIXED_SMALL
  clip_x0: bool = True  # clip the predicted x_0 to [-1, 1] when sampling
  edm: Preconditioning | None = None  # EDM's preconditioning, or None: a discrete-time model

  def __post_init__(self):
    object.__setattr__(self, "mean_type", parse_enum(MeanType, self.mean_type, "mean_type"))
    object.__setattr__(self, "var_type", parse_enum(VarType, self.var_type, "var_type"))

  @property
  def learns_variance(self) -> bool:
    return self.var_type in (VarType.LEARNED, VarType.LEARNED_RANGE)

  def output_channels(self, image_channels: int) -> int:
    """Channels the network must output: doubled when it also predicts the variance."""
    return image_channels * (2 if self.learns_variance else 1)


def parse_enum(enum_cls, value, name: str):
  """enum_cls(value), or a ValueError naming `name` and the known values."""
  try:
    return enum_cls(value)
  except ValueError:
    known = [m.value for m in enum_cls]
    raise ValueError(f"Unknown {name} {value!r}; known: {known}.") from None


def at(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] for t [B], shaped [B, 1, ..., 1] to broadcast against rank-`ndim` arrays."""
  return values[t].reshape(t.shape + (1,) * (ndim - t.ndim))


# ----------------------------------------------------------------------------- forward


def q_mean_variance(schedule: Schedule, x_start, t):
  """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. eq. 4) -> (mean, var, logvar)."""
  n = x_start.ndim
  mean = at(schedule.sqrt_alphas_cumprod, t, n) * x_start
  return (
    mean,
    at(1.0 - schedule.alphas_cumprod, t, n),
    at(schedule.log_one_minus_alphas_cumprod, t, n),
  )


def q_sample(schedule: Schedule, x_start, t, noise):
  """Draws x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4) for given noise eps."""
  n = x_start.ndim
  return (
    at(schedule.sqrt_alphas_cumprod, t, n) * x_start
    + at(schedule.sqrt_one_minus_alphas_cumprod, t, n) * noise
  )


def q_posterior(schedule: Schedule, x_start, x_t, t):
  """q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7) -> (mean, variance, clipped log variance)."""
  n = x_t.ndim
  mean = (
    at(schedule.posterior_mean_coef1, t, n) * x_start
    + at(schedule.posterior_mean_coef2, t, n) * x_t
  )
  return (
    mean,
    at(schedule.posterior_variance, t, n),
    at(schedule.posterior_log_variance_clipped, t, n),
  )


# ----------------------------------------------------------------------------- conversions


def x0_from_eps(schedule: Schedule, x_t, t, eps):
  """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
  n = x_t.ndim
  return (
    at(schedule.sqrt_recip_alphas_cumprod, t, n) * x_t
    - at(schedule.sqrt_recipm1_alphas_cumprod, t, n) * eps
  )


def eps_from_x0(schedule: Schedule, x_t, t, x_start):
  """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
  n = x_t.ndim
  return (at(schedule.sqrt_recip_alphas_cumprod, t, n) * x_t - x_start) / at(
    schedule.sqrt_recipm1_alphas_cumprod, t, n
  )


def x0_from_v(schedule: Schedule, x_t, t, v):
  """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022)."""
  n = x_t.ndim
  return (
    at(schedule.sqrt_alphas_cumprod, t, n) * x_t
    - at(schedule.sqrt_one_minus_alphas_cumprod, t, n) * v
  )


def v_target(schedule: Schedule, x_start, t, noise):
  """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the v-prediction target."""
  n = x_start.ndim
  return (
    at(schedule.sqrt_alphas_cumprod, t, n) * noise
    - at(schedule.sqrt_one_minus_alphas_cumprod, t, n) * x_start
  )


def mean_target(spec: ModelSpec, schedule: Schedule, x_start, t, noise):
  """The regression target of L_simple for the spec's mean parameterisation."""
  if spec.mean_type is MeanType.EPSILON:
    return noise
  if spec.mean_type is MeanType.X0:
    return x_start
  return v_target(schedule, x_start, t, noise)


def predict_x0(spec: ModelSpec, schedule: Schedule, mean_output, x_t, t):
  """The model's x_0 estimate from its mean output (unclipped)."""
  if spec.mean_type is MeanType.EPSILON:
    return x0_from_eps(schedule, x_t, t, mean_output)
  if spec.mean_type is MeanType.X0:
    return mean_output
  return x0_from_v(schedule, x_t, t, mean_output)


def predict_eps(spec: ModelSpec, schedule: Schedule, mean_output, x_t, t):
  """The model's eps estimate from its mean output: itself, or from its (unclipped) x_0."""
  if spec.mean_type is MeanType.EPSILON:
    return mean_output
  return eps_from_x0(schedule, x_t, t, predict_x0(spec, schedule, mean_output, x_t, t))


# ----------------------------------------------------------------------------- reverse


class PMeanVariance(NamedTuple):
  """p(x_{t-1} | x_t) = N(mean, variance); every field broadcasts against x_t."""

  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_x0: jax.Array


def split_output(spec: ModelSpec, model_output):
  """Splits [..., 2C] into (mean output, variance output) when the variance is learned."""
  if spec.learns_variance:
    return jnp.split(model_output, 2, axis=-1)
  return model_output, None


def model_log_variance(spec: ModelSpec, schedule: Schedule, var_output, t, ndim):
  """log sigma_t^2 of p(x_{t-1} | x_t) for the spec's variance type."""
  if spec.var_type is VarType.LEARNED:
    return var_output
  min_log = at(schedule.posterior_log_variance_clipped, t, ndim)
  if spec.var_type is VarType.FIXED_SMALL:
    return min_log
  if spec.var_type is VarType.FIXED_LARGE:
    # log beta_t, with beta~_1 at t=1 so that the decoder's variance stays small.
    return at(
      jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])), t, ndim
    )
  frac = (var_output + 1.0) / 2.0  # Improved DDPM eq. 15: v in [-1, 1] -> [0, 1]
  return frac * at(jnp.log(schedule.betas), t, ndim) + (1.0 - frac) * min_log


def p_mean_variance(
  spec: ModelSpec, schedule: Schedule, model_output, x_t, t, clip_x0: bool | None = None
) -> PMeanVariance:
  """Turns a model output into p(x_{t-1} | x_t) (Ho et al. eq. 11; Improved DDPM eq. 15).

  Args:
    spec: the output parameterisation.
    schedule: the schedule the model samples with.
    model_output: [B, H, W, C] or [B, H, W, 2C] (learned variance) network output.
    x_t: [B, H, W, C] noisy images.
    t: int [B] timesteps (indices into `schedule`).
    clip_x0: clip the predicted x_0 to [-1, 1]; defaults to `spec.clip_x0`.
  """
  mean_output, var_output = split_output(spec, model_output)
  log_variance = model_log_variance(spec, schedule, var_output, t, x_t.ndim)
  log_variance = jnp.broadcast_to(log_variance, x_t.shape)
  pred_x0 = predict_x0(spec, schedule, mean_output, x_t, t)
  if spec.clip_x0 if clip_x0 is None else clip_x0:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  mean, _, _ = q_posterior(schedule, pred_x0, x_t, t)
  return PMeanVariance(mean, jnp.exp(log_variance), log_variance, pred_x0)
