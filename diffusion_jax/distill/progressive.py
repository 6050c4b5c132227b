"""Progressive distillation's target and weighting (Salimans & Ho 2022, Algorithm 2), pure.

All rounds work on one grid: the teacher's timesteps at the first round's
N = distill.start_steps points, "trailing" spacing (`schedules.space_timesteps`),
point 0 clean data and point p the sampler's step index p - 1. A round whose
teacher steps over `stride` points of it trains the student to step over
2 stride points: its K-step grid is every (2 stride)-th point, exactly the
grid `--sampler=ddim --steps=K` visits on the student's run.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, losses
from diffusion_jax.sampling.loop import SamplingSchedule, noise_levels, respaced
from diffusion_jax.sampling.samplers import ddim_update

# x0_fn(x [B, H, W, C], step index [B] on the grid) -> the teacher's x_0 prediction [B, H, W, C]
X0Fn = Callable[[jax.Array, jax.Array], jax.Array]


def grid(schedule, num_steps: int) -> SamplingSchedule:
  """The `num_steps`-point grid of a T-step schedule: timesteps round(j T / N) - 1, j = 1..N."""
  return respaced(schedule, f"trailing{num_steps}")


def _level(values: jax.Array, point: jax.Array, ndim: int) -> jax.Array:
  """values[point] [B] shaped [B, 1, ..., 1] against rank-`ndim` images."""
  return diffusion.at(values, point, ndim)


def two_step_target(
  x0_fn: X0Fn, steps: SamplingSchedule, z: jax.Array, point: jax.Array, stride: jax.Array
) -> jax.Array:
  """x~ [B, H, W, C]: the x_0 whose one DDIM step from `point` lands where two teacher steps do.

  Algorithm 2: from z_t (grid point p = `point` [B]) the teacher takes DDIM
  steps (`ddim_update`, Song et al. eq. 12) to p - stride and p - 2 stride,
  reaching z_t''; then
      x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),
  so that alpha_t'' x~ + sigma_t'' (z_t - alpha_t x~) / sigma_t = z_t''. At
  p = 2 stride, t'' is clean data (sigma = 0, alpha = 1) and x~ = z_t''.
  """
  alpha, sigma = noise_levels(steps.schedule)  # [N + 1]
  level = lambda p: (_level(alpha, p, z.ndim), _level(sigma, p, z.ndim))
  mid, end = point - stride, point - 2 * stride
  z_mid = ddim_update(z, x0_fn(z, point - 1), level(point), level(mid))
  z_end = ddim_update(z_mid, x0_fn(z_mid, mid - 1), level(mid), level(end))
  (alpha_t, sigma_t), (alpha_end, sigma_end) = level(point), level(end)
  ratio = sigma_end / sigma_t
  return (z_end - ratio * z) / (alpha_end - ratio * alpha_t)


def truncated_snr_weight(alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """max(SNR, 1), SNR = alpha^2 / sigma^2 (Salimans & Ho sec. 4, "truncated SNR" weighting).

  On the x_0 error it makes the loss max(||x - x^||^2, ||eps - eps^||^2).
  """
  return jnp.maximum(jnp.square(alpha / sigma), 1.0)


def loss_terms(
  pred_x0: jax.Array, target: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> losses.LossTerms:
  """[B] terms: loss = max(SNR_t, 1) mean (x^ - x~)^2 over the pixels; mse unweighted; vb 0.

  alpha, sigma [B] are the student's noise level, pred_x0 its x_0 prediction.
  """
  mse = losses.mean_flat(jnp.square(pred_x0 - target))
  return losses.LossTerms(truncated_snr_weight(alpha, sigma) * mse, mse, jnp.zeros_like(mse))
