"""EDM's sampler (Karras et al. 2022, Algorithm 2): Heun's method on sigma, with optional churn.

    denoiser = sampling.denoisers.from_discrete(model_fn, spec, schedule)   # or from_edm(...)
    images = sampling.edm_sample(denoiser, key, (16, 32, 32, 3), num_steps=18)

One `lax.scan` over the N noise levels of EDM eq. 5 (`edm.karras_sigmas`)
and sigma_N = 0; each step is an Euler step with Heun's second-order
correction, except the last (sigma_N = 0): 2N - 1 network calls per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import edm
from diffusion_jax.config.sampler import EDM_DEFAULT_STEPS
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.sampling import denoisers
from diffusion_jax.sampling.denoisers import Denoiser
from diffusion_jax.sampling.loop import ModelFn, SamplingSchedule, initial_noise, run_steps
from diffusion_jax.schedules import Schedule


def noise_levels(
  denoiser: Denoiser,
  num_steps: int,
  sigma_min: float = edm.SIGMA_MIN,
  sigma_max: float = edm.SIGMA_MAX,
  rho: float = edm.RHO,
) -> jax.Array:
  """float32 [N + 1]: t_0 > ... > t_{N-1} of eq. 5, rounded to the model's grid, and t_N = 0.

  [sigma_min, sigma_max] is clamped to the range the denoiser supports, as EDM's
  generate.py does.
  """
  sigmas = edm.karras_sigmas(
    num_steps,
    jnp.maximum(sigma_min, denoiser.sigma_min),
    jnp.minimum(sigma_max, denoiser.sigma_max),
    rho,
  )
  return jnp.concatenate([denoiser.round_sigma(sigmas), jnp.zeros((1,), jnp.float32)])


def edm_sample(
  denoiser: Denoiser,
  key: jax.Array,
  shape,
  *,
  num_steps: int = EDM_DEFAULT_STEPS,
  sigma_min: float = edm.SIGMA_MIN,
  sigma_max: float = edm.SIGMA_MAX,
  rho: float = edm.RHO,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = float("inf"),
  s_noise: float = 1.0,
  x_T: jax.Array | None = None,
  churn_noise: jax.Array | None = None,
) -> jax.Array:
  """EDM Algorithm 2 from x_0 = t_0 x_T, x_T ~ N(0, I) (given or drawn from key): float32 `shape`.

  Step i, from t_i to t_{i+1}:
    gamma = min(S_churn / N, sqrt(2) - 1) if S_tmin <= t_i <= S_tmax else 0
    t^ = t_i (1 + gamma) (rounded);  x^ = x + sqrt(t^2 - t_i^2) S_noise eps_i
    d = (x^ - D(x^; t^)) / t^;  x' = x^ + (t_{i+1} - t^) d            (Euler)
    if t_{i+1} > 0: x' = x^ + (t_{i+1} - t^) (d + (x' - D(x'; t_{i+1})) / t_{i+1}) / 2  (Heun)
  S_churn = 0 is the deterministic sampler (Algorithm 1). The correction is a
  `lax.cond`, so the last step really makes one call: 2N - 1 in all.

  Args:
    denoiser: the model as D(x; sigma) (`denoisers.from_edm`, `from_discrete`, ...).
    key: draws x_T (unless given) and each step's churn noise eps_i = N(0, I)
      from fold_in(key', i).
    shape: the batch's shape [B, H, W, C].
    num_steps: N, the noise levels of eq. 5.
    sigma_min, sigma_max, rho: eq. 5's discretisation (EDM: 0.002, 80, 7).
    s_churn, s_tmin, s_tmax, s_noise: the stochasticity of Algorithm 2.
    x_T: [B, H, W, C] unit-variance starting noise, instead of drawing it.
    churn_noise: [N, B, H, W, C] the eps_i, instead of drawing them.
  """
  t_steps = noise_levels(denoiser, num_steps, sigma_min, sigma_max, rho)
  latents, key = initial_noise(key, shape, x_T)
  gamma = edm.churn_gamma(num_steps, s_churn)
  if churn_noise is not None:
    churn_noise = jnp.asarray(churn_noise)
    if churn_noise.shape != (num_steps, *shape):
      raise ValueError(
        f"churn_noise has shape {churn_noise.shape}, expected {(num_steps, *tuple(shape))}."
      )

  def denoise(x, sigma):
    return denoiser.denoise(x, jnp.full(x.shape[:1], sigma, jnp.float32))

  def step(x, i, step_key, state):
    t_cur, t_next = t_steps[i], t_steps[i + 1]
    if gamma:
      churn = jnp.where((s_tmin <= t_cur) & (t_cur <= s_tmax), gamma, 0.0)
      t_hat = denoiser.round_sigma(t_cur + churn * t_cur)
      eps = jax.random.normal(step_key, x.shape, x.dtype) if churn_noise is None else churn_noise[i]
      # max(., 0): XLA may fuse t^2 - t^2 into an FMA that rounds below 0 where gamma = 0.
      added = jnp.sqrt(jnp.maximum(jnp.square(t_hat) - jnp.square(t_cur), 0.0))
      x = x + added * s_noise * eps
    else:
      t_hat = t_cur
    denoised = denoise(x, t_hat)
    slope = (x - denoised) / t_hat
    x_euler = x + (t_next - t_hat) * slope

    def heun(x_euler):
      slope_next = (x_euler - denoise(x_euler, t_next)) / t_next
      return x + (t_next - t_hat) * 0.5 * (slope + slope_next)

    x_next = jax.lax.cond(t_next > 0, heun, lambda x_euler: x_euler, x_euler)
    return x_next, denoised, state

  indices = jnp.arange(num_steps, dtype=jnp.int32)
  return run_steps(step, latents * t_steps[0], indices, key if gamma else None, steps=None)


def edm_heun_sample(
  model_fn: ModelFn,
  spec: ModelSpec,
  schedule: Schedule | SamplingSchedule,
  key: jax.Array,
  shape,
  *,
  num_steps: int = EDM_DEFAULT_STEPS,
  x_T: jax.Array | None = None,
  **options,
) -> jax.Array:
  """`edm_sample` of a discrete-time model (the samplers' common signature), sigma rounded
  to the timesteps of `schedule` (`denoisers.from_discrete`). options: edm_sample's."""
  return edm_sample(
    denoisers.from_discrete(model_fn, spec, schedule),
    key,
    shape,
    num_steps=num_steps,
    x_T=x_T,
    **options,
  )
