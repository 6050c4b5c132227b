"""Every model as one denoiser D(x; sigma) over continuous noise levels (Karras et al. 2022).

EDM's sampler walks noise levels sigma of x = y + sigma n, not a timestep
grid. `Denoiser` is that view of a model; the adapters below make one of

  * an EDM-preconditioned network (`from_edm`): D = c_skip x + c_out F(c_in x, c_noise);
  * a discrete-time eps/x0/v model of the DDPM family (`from_discrete`), as EDM's
    `iDDPMPrecond` does: sigma_t = sqrt(1 / abar_t - 1), the network sees
    x / sqrt(1 + sigma^2) at the timestep whose sigma_t is nearest to sigma
    (`round_sigma`), and D = x - sigma eps_hat; learned-variance models give
    their mean channels, rescale_timesteps is the model_fn's own business;
  * a continuous-time VP eps-model (`from_vp`), as EDM's `VPPrecond`.

`as_discrete_model` goes the other way: an EDM network as an x_0-predicting
model_fn(x_t, t) on a discrete schedule, for the DDPM/DDIM/DPM-Solver samplers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, edm
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.sampling.loop import ModelFn, SamplingSchedule, as_sampling_schedule
from diffusion_jax.schedules import Schedule

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], sigma [B]) -> D [B, ...]


def _identity(sigma: jax.Array) -> jax.Array:
  return sigma


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A model as EDM's sampler sees it: D(x; sigma) on the noise levels it supports."""

  denoise: DenoiseFn
  sigma_min: float | jax.Array  # the smallest and largest sigma the model knows
  sigma_max: float | jax.Array
  # The nearest sigma the model is evaluated at (its discrete grid), elementwise.
  round_sigma: Callable[[jax.Array], jax.Array] = _identity


def _clipped(d: jax.Array, clip: bool) -> jax.Array:
  return jnp.clip(d, -1.0, 1.0) if clip else d


def discrete_sigmas(schedule: Schedule) -> jax.Array:
  """sigma_t = sqrt(1 / abar_t - 1) [T], increasing: the VP process's noise levels in EDM's x."""
  return schedule.sqrt_recipm1_alphas_cumprod  # from the float64-derived schedule terms


def nearest_index(sigmas: jax.Array, sigma: jax.Array) -> jax.Array:
  """int32 [B]: the index of the increasing `sigmas` [T] nearest to each sigma [B] (ties: lower)."""
  upper = jnp.clip(jnp.searchsorted(sigmas, sigma), 1, sigmas.shape[0] - 1)
  lower_is_nearer = sigma - sigmas[upper - 1] <= sigmas[upper] - sigma
  return jnp.where(lower_is_nearer, upper - 1, upper).astype(jnp.int32)


def from_discrete(
  model_fn: ModelFn, spec: ModelSpec, schedule: Schedule | SamplingSchedule
) -> Denoiser:
  """A discrete-time model as D(x; sigma), EDM's `iDDPMPrecond` mapping (EDM App. C.3.4).

  D(x; sigma) = x - sigma eps_hat(x / sqrt(1 + sigma^2), t), t the timestep
  whose sigma_t is nearest to sigma; eps_hat is the network's eps, or derived
  from its x_0 / v prediction at t. At sigma = sigma_t, D is the model's x_0
  prediction, clipped to [-1, 1] when spec.clip_x0. `schedule` may be a
  respaced `SamplingSchedule`: sigma then rounds to its steps only.
  """
  steps = as_sampling_schedule(schedule)
  sigmas = discrete_sigmas(steps.schedule)

  def denoise(x, sigma):
    index = nearest_index(sigmas, sigma)
    sigma = edm.per_example(sigma, x.ndim)
    x_t = x * jax.lax.rsqrt(1.0 + jnp.square(sigma))
    mean_output, _ = diffusion.split_output(spec, model_fn(x_t, steps.timesteps[index]))
    eps = diffusion.predict_eps(spec, steps.schedule, mean_output, x_t, index)
    return _clipped(x - sigma * eps, spec.clip_x0)

  return Denoiser(
    denoise, sigmas[0], sigmas[-1], round_sigma=lambda sigma: sigmas[nearest_index(sigmas, sigma)]
  )


def from_edm(net_fn: edm.NetFn, spec: ModelSpec) -> Denoiser:
  """An EDM-preconditioned network (spec.edm) as D(x; sigma), eq. 7; any sigma > 0."""
  if spec.edm is None:
    raise ValueError("from_edm needs an EDM-preconditioned model (ModelSpec.edm set).")
  return Denoiser(
    lambda x, sigma: _clipped(spec.edm.denoise(net_fn, x, sigma), spec.clip_x0),
    sigma_min=0.0,
    sigma_max=float("inf"),
  )


def from_vp(
  model_fn: ModelFn,
  spec: ModelSpec,
  *,
  beta_d: float = 19.9,
  beta_min: float = 0.1,
  num_timesteps: int = 1000,
  epsilon_t: float = 1e-5,
) -> Denoiser:
  """A continuous-time VP eps-model (Song et al. 2021) as D(x; sigma), EDM's `VPPrecond`.

  D(x; sigma) = x - sigma eps_hat(x / sqrt(1 + sigma^2), (M - 1) t(sigma)) with
  t(sigma) = `edm.vp_sigma_inv`, on sigma in [sigma(epsilon_t), sigma(1)]. The
  network is called at fractional timesteps on [0, M - 1]: DDPM's linear
  schedule at T = M = 1000 is this process's discretisation.
  """
  if spec.mean_type is not diffusion.MeanType.EPSILON:
    raise ValueError(
      f"from_vp takes eps-prediction models, got mean_type {spec.mean_type.value!r}."
    )
  vp = dict(beta_d=beta_d, beta_min=beta_min)

  def denoise(x, sigma):
    c_noise = (num_timesteps - 1) * edm.vp_sigma_inv(sigma, **vp)
    sigma = edm.per_example(sigma, x.ndim)
    eps, _ = diffusion.split_output(
      spec, model_fn(x * jax.lax.rsqrt(1.0 + jnp.square(sigma)), c_noise)
    )
    return _clipped(x - sigma * eps, spec.clip_x0)

  return Denoiser(denoise, edm.vp_sigma(epsilon_t, **vp), edm.vp_sigma(1.0, **vp))


def as_discrete_model(
  denoiser: Denoiser, spec: ModelSpec, schedule: Schedule
) -> tuple[ModelFn, ModelSpec]:
  """(model_fn(x_t, t) -> x_0 prediction, its ModelSpec): a denoiser on a discrete schedule.

  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps is x / sqrt(1 + sigma_t^2), so
  the x_0 prediction at t is D(x_t sqrt(1 + sigma_t^2); sigma_t); t are the
  training timesteps of `schedule`. The DDPM, DDIM and DPM-Solver samplers run
  EDM networks through it; the spec returned is `spec` predicting x_0 (the
  variance type stays the run's).
  """
  sigmas = discrete_sigmas(schedule)

  def model_fn(x_t, t):
    x = x_t * edm.per_example(schedule.sqrt_recip_alphas_cumprod[t], x_t.ndim)
    return denoiser.denoise(x, sigmas[t])

  return model_fn, dataclasses.replace(spec, mean_type=diffusion.MeanType.X0, edm=None)
