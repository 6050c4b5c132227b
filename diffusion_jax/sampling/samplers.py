"""Reverse-process samplers: ancestral DDPM, DDIM and its inversion, DPM-Solver++(2M/3M), EDM,
consistency models.

Each is a pure function compiled as one `lax.scan` (see `loop.run_steps`):

    images = sampler(model_fn, spec, schedule, key, shape, *, x_T=None, trajectory_every=0)

`model_fn(x_t [B, H, W, C], t int32 [B]) -> output` takes the training
timesteps; `schedule` is a `Schedule` (all T steps) or a `SamplingSchedule`
from `respaced(schedule, steps)`. The result is float32 [B, H, W, C] in data
space (x_0 clipped to [-1, 1] at every step when `spec.clip_x0`), or
`(images, Trajectory)` with trajectory_every = k > 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.sampling.consistency_sampler import consistency_model_sample
from diffusion_jax.sampling.edm_sampler import edm_heun_sample
from diffusion_jax.sampling.loop import (
  ModelFn,
  SamplingSchedule,
  as_sampling_schedule,
  initial_noise,
  noise_levels,
  predict_x0,
  run_steps,
)
from diffusion_jax.schedules import Schedule


def _descending(num_steps: int, stop: int = 0) -> jax.Array:
  """Step indices K-1, ..., stop: the reverse process runs from noise to data."""
  return jnp.arange(num_steps - 1, stop - 1, -1, dtype=jnp.int32)


def ddpm_sample(
  model_fn: ModelFn,
  spec: ModelSpec,
  schedule: Schedule | SamplingSchedule,
  key: jax.Array,
  shape,
  *,
  x_T: jax.Array | None = None,
  trajectory_every: int = 0,
):
  """Ancestral sampling (Ho et al. 2020, Algorithm 2) for every variance type.

  x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), with no noise at the
  last step; mu and sigma from `diffusion.p_mean_variance` (Ho et al. eq. 11,
  Improved DDPM eq. 15). On a respaced schedule this is Improved DDPM's
  strided sampling (sec. 4): the variances are those of the respaced betas.
  """
  steps = as_sampling_schedule(schedule)
  x, key = initial_noise(key, shape, x_T)

  def step(x, i, key, state):
    t = jnp.full(x.shape[:1], i, jnp.int32)
    p = diffusion.p_mean_variance(spec, steps.schedule, model_fn(x, steps.timesteps[t]), x, t)
    noise = jax.random.normal(key, x.shape, x.dtype)
    x_prev = p.mean + jnp.where(i > 0, jnp.exp(0.5 * p.log_variance), 0.0) * noise
    return x_prev, p.pred_x0, state

  return run_steps(
    step, x, _descending(steps.num_steps), key, steps, trajectory_every=trajectory_every
  )


def ddim_update(x, x0, level_from, level_to, noise_scale=0.0, noise=0.0):
  """Song et al. 2021 eq. 12 from x = alpha_s x_0 + sigma_s eps to noise level (alpha_r, sigma_r).

  x_r = alpha_r x0 + sqrt(sigma_r^2 - noise_scale^2) eps + noise_scale z, with
  eps = (x - alpha_s x0) / sigma_s recomputed from the (possibly clipped) x0.
  """
  (alpha_s, sigma_s), (alpha_r, sigma_r) = level_from, level_to
  eps = (x - alpha_s * x0) / sigma_s
  direction = jnp.sqrt(jnp.maximum(jnp.square(sigma_r) - jnp.square(noise_scale), 0.0))
  return alpha_r * x0 + direction * eps + noise_scale * noise


def ddim_sample(
  model_fn: ModelFn,
  spec: ModelSpec,
  schedule: Schedule | SamplingSchedule,
  key: jax.Array,
  shape,
  *,
  eta: float = 0.0,
  x_T: jax.Array | None = None,
  trajectory_every: int = 0,
):
  """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is ancestral DDPM.

  sigma_t(eta) = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
  (eq. 16), i.e. eta times the posterior standard deviation of the (respaced)
  schedule. The last step lands on x_0 itself (abar = 1).
  """
  steps = as_sampling_schedule(schedule)
  x, key = initial_noise(key, shape, x_T)
  alpha, sigma = noise_levels(steps.schedule)
  noise_scales = eta * jnp.sqrt(steps.schedule.posterior_variance)  # [K]

  def step(x, i, key, state):
    x0 = predict_x0(model_fn, spec, steps, x, i)
    noise = jax.random.normal(key, x.shape, x.dtype)
    x_prev = ddim_update(
      x, x0, (alpha[i + 1], sigma[i + 1]), (alpha[i], sigma[i]), noise_scales[i], noise
    )
    return x_prev, x0, state

  return run_steps(
    step, x, _descending(steps.num_steps), key, steps, trajectory_every=trajectory_every
  )


def ddim_invert(
  model_fn: ModelFn,
  spec: ModelSpec,
  schedule: Schedule | SamplingSchedule,
  x_0: jax.Array,
  *,
  trajectory_every: int = 0,
):
  """Deterministic DDIM encoding x_0 -> x_T: the eta = 0 ODE of `ddim_sample` run forward.

  Step i moves x from abar_i to abar_{i+1} (`alphas_cumprod_next`) with the eps
  predicted at step i (Song et al. sec. 4.3). x_0 [B, H, W, C] is taken as the
  state at step 0 (abar_0 ~ 1), so the K - 1 steps give the state at step K - 1
  from which `ddim_sample(..., x_T=...)` starts; no randomness is used.
  """
  steps = as_sampling_schedule(schedule)
  alpha, sigma = noise_levels(steps.schedule)

  def step(x, i, key, state):
    del key
    x0 = predict_x0(model_fn, spec, steps, x, i)
    x_next = ddim_update(x, x0, (alpha[i + 1], sigma[i + 1]), (alpha[i + 2], sigma[i + 2]))
    return x_next, x0, state

  indices = jnp.arange(steps.num_steps - 1, dtype=jnp.int32)
  return run_steps(step, x_0, indices, None, steps, trajectory_every=trajectory_every)


LOWER_ORDER_FINAL_BELOW = 15  # solver steps; DPM-Solver's and diffusers' `lower_order_final`


class _Multistep(NamedTuple):
  """What DPM-Solver++ keeps from its two previous steps (zeros before they happen)."""

  x0: jax.Array  # the data prediction x_theta(x_{t_{i-1}}, t_{i-1})
  h: jax.Array  # the step in lambda that followed it
  x0_before: jax.Array  # x_theta(x_{t_{i-2}}, t_{i-2})
  h_before: jax.Array  # the step in lambda that followed it


def solver_orders(num_steps: int, stop: int, order: int, lower_order_final: bool) -> np.ndarray:
  """int32 [K]: the order of DPM-Solver++'s step from grid index i, for i in [stop, K).

  Multistep warm-up: the j-th step (from 0) has order <= j + 1. With
  `lower_order_final` and fewer than 15 steps between timesteps (K - 1), the
  step onto the smallest timestep (index 1) is first order and the one before
  it at most second order, as in Lu et al.'s code and diffusers (whose
  final_sigmas_type="sigma_min" ends there). The step to lambda = inf (index 0,
  `denoise_to_zero`) is first order.
  """
  orders = np.zeros(num_steps, np.int32)
  lower = lower_order_final and num_steps - 1 < LOWER_ORDER_FINAL_BELOW
  for j, i in enumerate(range(num_steps - 1, stop - 1, -1)):
    cap = {0: 1, 1: 1 if lower else order, 2: 2 if lower else order}.get(i, order)
    orders[i] = min(order, j + 1, cap)
  return orders


def dpm_solver_sample(
  model_fn: ModelFn,
  spec: ModelSpec,
  schedule: Schedule | SamplingSchedule,
  key: jax.Array,
  shape,
  *,
  order: int = 2,
  lower_order_final: bool = True,
  denoise_to_zero: bool = True,
  x_T: jax.Array | None = None,
  trajectory_every: int = 0,
):
  """DPM-Solver++(2M) and (3M) (Lu et al. 2022, Algorithm 2 and App. B): multistep, data prediction.

  With lambda = log(alpha / sigma), the step from s to t, h = lambda_t - lambda_s,
  and the data predictions m0, m1, m2 at s and the two grid points before it
  (h_0, h_1 the steps that followed those, r0 = h_0 / h, r1 = h_1 / h), is
      order 1: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m0,
      order 2: the same with m0 + (m0 - m1) / (2 r0) for m0,
      order 3: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m0
               + alpha_t ((e^{-h} - 1) / h + 1) D1 - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) D2,
               D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
               D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1),
  diffusers' DPMSolverMultistepScheduler step for step; `solver_orders` says
  which order each step takes (`lower_order_final`: fewer than 15 steps end
  with lower orders, which keeps very few steps stable).

  Time discretisation: the solver's time points are the K steps of `schedule`,
  discrete training timesteps. Use `logsnr_respaced(schedule, K)`, uniform in
  lambda over [0, T-1], as Lu et al. do; uniform time (`respaced(schedule, K)`)
  leaves a long last step in lambda near t = 0 and is far less accurate at
  K <= 25 (see docs/sampling.md). The K - 1 steps end at the smallest timestep;
  `denoise_to_zero` adds the final, first-order step to lambda = inf, which
  returns that step's x_0 prediction (one more model call, K in all).
  """
  if order not in (1, 2, 3):
    raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}.")
  steps = as_sampling_schedule(schedule)
  x, _ = initial_noise(key, shape, x_T)
  alpha, sigma = noise_levels(steps.schedule)
  lam = jnp.log(alpha) - jnp.log(sigma)  # [K+1], +inf at the clean grid point 0
  stop = 0 if denoise_to_zero else 1
  orders = jnp.asarray(solver_orders(steps.num_steps, stop, order, lower_order_final))

  def step(x, i, key, prev):
    del key
    x0 = predict_x0(model_fn, spec, steps, x, i)
    h = lam[i] - lam[i + 1]
    phi = jnp.expm1(-h)  # e^{-h} - 1
    half_inv_r = jnp.where(orders[i] >= 2, h / (2.0 * prev.h), 0.0)  # 1 / (2 r0)
    d = x0 + half_inv_r * (x0 - prev.x0)
    x_next = sigma[i] / sigma[i + 1] * x - alpha[i] * phi * d
    if order == 3:
      r0, r1 = prev.h / h, prev.h_before / h
      d1_0, d1_1 = (x0 - prev.x0) / r0, (prev.x0 - prev.x0_before) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      third = (
        sigma[i] / sigma[i + 1] * x
        - alpha[i] * phi * x0
        + alpha[i] * (phi / h + 1.0) * d1
        - alpha[i] * ((phi + h) / h**2 - 0.5) * d2
      )
      x_next = jnp.where(orders[i] == 3, third, x_next)
    return x_next, x0, _Multistep(x0, h, prev.x0, prev.h)

  zero = jnp.zeros((), x.dtype)
  start = _Multistep(jnp.zeros_like(x), zero, jnp.zeros_like(x), zero)
  indices = _descending(steps.num_steps, stop=stop)
  return run_steps(step, x, indices, None, steps, state=start, trajectory_every=trajectory_every)


SAMPLERS = {
  "ddpm": ddpm_sample,
  "ddim": ddim_sample,
  "dpm_solver": dpm_solver_sample,
  "edm_heun": edm_heun_sample,
  "consistency": consistency_model_sample,
}


def get_sampler(name: str):
  """The sampler called `name`: "ddpm", "ddim", "dpm_solver", "edm_heun" or "consistency"."""
  if name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {name!r}; known: {sorted(SAMPLERS)}.")
  return SAMPLERS[name]
