"""Consistency models (Song, Dhariwal, Chen & Sutskever 2023; Song & Dhariwal 2023, "iCT"), pure.

A consistency function f(x, sigma) maps any point x = y + sigma n of the
probability-flow ODE's trajectory to its endpoint at sigma_min. It is an
EDM-style network F with the boundary condition f(x, sigma_min) = x built in
(CM App. C):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in x, c_noise),
    c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2),
    c_out  = s_d (sigma - sigma_min) / sqrt(sigma^2 + s_d^2),

with EDM's c_in and c_noise (edm.Preconditioning). Here: those coefficients,
the Karras discretisation of [sigma_min, sigma_max] and the schedules of its
size N(k), iCT's lognormal choice of the level, the pseudo-Huber metric and
the ODE step of consistency distillation; the network enters as a plain
callable. The sampler is sampling/consistency_sampler.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import edm

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # both papers' CIFAR-10 settings (EDM's)
HUBER_SCALE = 0.00054  # iCT sec. 3.3: c = 0.00054 sqrt(d) for d-dimensional data

# f(x [B, H, W, C], sigma [B]) -> [B, H, W, C]: a consistency function (or a denoiser D).
ConsistencyFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ConsistencyPreconditioning(edm.Preconditioning):
  """EDM's preconditioning with CM's c_skip and c_out: `denoise` is then f(x, sigma).

  A run with diffusion.parameterization = "consistency" has it as its
  ModelSpec.edm, so every adapter that reads an EDM network (denoisers.from_edm)
  reads this one's f.
  """

  sigma_min: float = SIGMA_MIN

  def coefficients(self, sigma: jax.Array) -> edm.Coefficients:
    """CM App. C: c_skip(sigma_min) = 1 and c_out(sigma_min) = 0; c_in, c_noise as EDM's."""
    c = super().coefficients(sigma)
    sigma = jnp.asarray(sigma, jnp.float32)
    shifted = sigma - self.sigma_min
    return c._replace(
      c_skip=self.sigma_data**2 / (jnp.square(shifted) + self.sigma_data**2),
      c_out=self.sigma_data * shifted * jax.lax.rsqrt(jnp.square(sigma) + self.sigma_data**2),
    )


def karras_boundaries(
  num_scales: jax.Array | int,
  size: int,
  sigma_min: float = SIGMA_MIN,
  sigma_max: float = SIGMA_MAX,
  rho: float = RHO,
) -> jax.Array:
  """float32 [size]: sigma_1 < ... < sigma_N of CM eq. 5's discretisation, padded past N.

  sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,
  i = 1..N (EDM eq. 5 in increasing order); N = `num_scales` may be traced, so
  the array has a static `size` >= N and entries past N are sigma_max.
  """
  fraction = jnp.minimum(jnp.arange(size, dtype=jnp.float32) / (num_scales - 1.0), 1.0)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return jnp.power(lo + fraction * (hi - lo), rho)


def ict_num_scales(
  step: jax.Array | int, total_steps: int, start: int = 10, end: int = 1280
) -> jax.Array:
  """iCT's discretisation curriculum (Song & Dhariwal 2023, eq. 5): int32 [] N(k).

  N(k) = min(s_0 2^floor(k / K'), s_1) + 1, K' = floor(K / (log2 floor(s_1 / s_0) + 1)),
  K the run's total steps: N doubles K' times from s_0 + 1 = 11 to s_1 + 1 = 1281.
  """
  stage = max(total_steps // (int(math.log2(end // start)) + 1), 1)  # K'
  doublings = jnp.minimum(jnp.asarray(step, jnp.int32) // stage, 30)
  return jnp.minimum(start * jnp.left_shift(1, doublings), end) + 1


def lognormal_level_logits(
  sigmas: jax.Array, num_scales: jax.Array | int, p_mean: float, p_std: float
) -> jax.Array:
  """float32 [size]: log p(i) of iCT's level i (sigma_i -> sigma_{i+1}), i = 0..N-2 (0-based).

  p(sigma_i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) /
  (sqrt(2) P_std)) (iCT sec. 3.5): the lognormal mass between the two levels;
  -inf for i >= N - 1 (no level above).
  """
  cdf = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
  mass = jnp.append(cdf[1:] - cdf[:-1], 0.0)
  valid = jnp.arange(sigmas.shape[0]) < num_scales - 1
  return jnp.where(valid & (mass > 0), jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


def pseudo_huber(x: jax.Array, y: jax.Array, scale: float = HUBER_SCALE) -> jax.Array:
  """[B]: sqrt(||x - y||^2 + c^2) - c over each example, c = scale sqrt(d) (iCT sec. 3.3).

  Computed as ||x - y||^2 / (sqrt(||x - y||^2 + c^2) + c), the same value
  without float32's cancellation where ||x - y|| << c.
  """
  c = scale * math.sqrt(math.prod(x.shape[1:]))
  squared = jnp.sum(jnp.square(x - y), axis=tuple(range(1, x.ndim)))
  return squared / (jnp.sqrt(squared + c**2) + c)


def squared_l2(x: jax.Array, y: jax.Array) -> jax.Array:
  """[B]: ||x - y||^2 / d, the mean squared error of each example (CM's l2 metric, per pixel)."""
  return jnp.mean(jnp.square(x - y), axis=tuple(range(1, x.ndim)))


def heun_step(
  denoise: ConsistencyFn, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array
) -> jax.Array:
  """One Heun step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM Alg. 1).

  x [B, ...] at noise levels sigma [B] -> sigma_next [B] (both > 0): CD's
  solver, 2 calls of the teacher's denoiser.
  """
  level = lambda s: edm.per_example(s, x.ndim)
  slope = (x - denoise(x, sigma)) / level(sigma)
  x_euler = x + level(sigma_next - sigma) * slope
  slope_next = (x_euler - denoise(x_euler, sigma_next)) / level(sigma_next)
  return x + level(sigma_next - sigma) * 0.5 * (slope + slope_next)
