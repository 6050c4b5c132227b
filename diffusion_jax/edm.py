"""EDM: noise levels sigma, preconditioning and training loss (Karras et al. 2022).

"Elucidating the Design Space of Diffusion-Based Generative Models". Data y
is noised as x = y + sigma n, n ~ N(0, I), and a denoiser D(x; sigma)
estimates E[y | x]. Pure functions of arrays, as diffusion.py: the network
enters as a plain callable `net_fn(x_in [B, H, W, C], c_noise [B]) -> F`,
and here only its output is interpreted.

A discrete-time model of the DDPM family sees the same process: its x_t =
sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps is x / sqrt(1 + sigma_t^2) with
sigma_t = sqrt(1 / abar_t - 1) (EDM Table 1, VP column); sampling/denoisers.py
holds the adapters that make every model a D(x; sigma).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import losses

# net_fn(x_in [B, H, W, C], c_noise float32 [B]) -> F [B, H, W, C]: the raw network of EDM eq. 7.
NetFn = Callable[[jax.Array, jax.Array], jax.Array]

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # EDM sec. 3 / Table 1: the sampler's defaults


def per_example(sigma: jax.Array, ndim: int) -> jax.Array:
  """sigma [B] shaped [B, 1, ..., 1] to broadcast against rank-`ndim` images."""
  return jnp.reshape(sigma, sigma.shape + (1,) * (ndim - sigma.ndim))


class Coefficients(NamedTuple):
  """EDM eq. 7's scalings at noise levels sigma [B]: D = c_skip x + c_out F(c_in x, c_noise)."""

  c_skip: jax.Array
  c_out: jax.Array
  c_in: jax.Array
  c_noise: jax.Array


@dataclasses.dataclass(frozen=True)
class Preconditioning:
  """EDM's preconditioning of a network (Table 1, "Ours" column) and its training loss.

  Hashable, so it can be a static part of a jitted function.
  """

  sigma_data: float = 0.5  # the data's standard deviation (images in [-1, 1])
  p_mean: float = -1.2  # ln sigma ~ N(p_mean, p_std^2) in training (Table 1, sec. 5)
  p_std: float = 1.2

  def __post_init__(self):
    for key in ("sigma_data", "p_std"):
      if not getattr(self, key) > 0:
        raise ValueError(f"EDM {key} must be positive, got {getattr(self, key)}.")

  def coefficients(self, sigma: jax.Array) -> Coefficients:
    """Table 1: c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
    c_in = 1 / sqrt(sigma^2 + s_d^2), c_noise = ln(sigma) / 4; each [B] for sigma [B]."""
    sigma = jnp.asarray(sigma, jnp.float32)
    total = jnp.square(sigma) + self.sigma_data**2
    return Coefficients(
      c_skip=self.sigma_data**2 / total,
      c_out=sigma * self.sigma_data * jax.lax.rsqrt(total),
      c_in=jax.lax.rsqrt(total),
      c_noise=0.25 * jnp.log(sigma),
    )

  def denoise(self, net_fn: NetFn, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (eq. 7) for x [B, ...], sigma [B]."""
    c = self.coefficients(sigma)
    scale = lambda c_i: per_example(c_i, x.ndim)
    return scale(c.c_skip) * x + scale(c.c_out) * net_fn(scale(c.c_in) * x, c.c_noise)

  def loss_weight(self, sigma: jax.Array) -> jax.Array:
    """lambda(sigma) = (sigma^2 + s_d^2) / (sigma s_d)^2 (Table 1): unit loss at every sigma."""
    return (jnp.square(sigma) + self.sigma_data**2) / jnp.square(sigma * self.sigma_data)

  def sigma_from_normal(self, normal: jax.Array) -> jax.Array:
    """ln sigma = p_mean + p_std n: the training noise levels for standard normals n [B]."""
    return jnp.exp(self.p_mean + self.p_std * normal)


@dataclasses.dataclass(frozen=True)
class LogNormalSigmas:
  """Training noise levels ln sigma ~ N(p_mean, p_std^2) with unit weights (EDM sec. 5).

  The interface of `losses.UniformSampler` (init, sample, update, quarter),
  so the train step draws sigma [B] where a DDPM run draws t [B].
  """

  precond: Preconditioning

  def init(self) -> tuple:
    return ()

  def sample(self, state, key, batch_size: int):
    """-> (sigma float32 [B], weights float32 [B] of ones)."""
    del state
    normal = jax.random.normal(key, (batch_size,), jnp.float32)
    return self.precond.sigma_from_normal(normal), jnp.ones((batch_size,), jnp.float32)

  def update(self, state, sigma, loss):
    del sigma, loss
    return state

  def quarter(self, sigma: jax.Array) -> jax.Array:
    """int32 [B]: which quartile of the training distribution each sigma [B] lies in (0..3)."""
    z = (jnp.log(sigma) - self.precond.p_mean) / self.precond.p_std
    quartile = 0.6744897501960817  # the standard normal's 75% point
    return jnp.searchsorted(jnp.array([-quartile, 0.0, quartile]), z).astype(jnp.int32)


def training_losses(
  net_fn: NetFn, precond: Preconditioning, y: jax.Array, sigma: jax.Array, noise: jax.Array
) -> losses.LossTerms:
  """EDM's loss (eq. 8, Table 1) at noise levels sigma [B] for unit noise n [B, H, W, C]: [B] terms.

  loss = lambda(sigma) mean ||D(y + sigma n; sigma) - y||^2 over the pixels.
  EDM's code (training/loss.py EDMLoss) sums over the pixels instead: a
  constant factor H W C, which Adam's updates do not see. `mse` is the
  unweighted mean squared error of D; `vb` is 0 (no variational bound).
  """
  x = y + per_example(sigma, y.ndim) * noise
  mse = losses.mean_flat(jnp.square(precond.denoise(net_fn, x, sigma) - y))
  return losses.LossTerms(precond.loss_weight(sigma) * mse, mse, jnp.zeros_like(mse))


def karras_sigmas(
  num_steps: int, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho: float = RHO
) -> jax.Array:
  """EDM eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < N.

  float32 [N], from sigma_max down to sigma_min (sigma_min, sigma_max may be traced
  arrays). N = 1 gives sigma_max alone.
  """
  if num_steps < 1:
    raise ValueError(f"The EDM sampler needs num_steps >= 1, got {num_steps}.")
  fraction = jnp.arange(num_steps, dtype=jnp.float32) / max(num_steps - 1, 1)
  lo, hi = jnp.power(sigma_min, 1.0 / rho), jnp.power(sigma_max, 1.0 / rho)
  return jnp.power(hi + fraction * (lo - hi), rho).astype(jnp.float32)


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1):
  """Song et al.'s continuous VP process as EDM writes it (Table 1): sigma(t) =
  sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t in [0, 1]."""
  return jnp.sqrt(jnp.expm1(0.5 * beta_d * jnp.square(t) + beta_min * t))


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1):
  """The t in [0, 1] of `vp_sigma`: (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
  return (jnp.sqrt(beta_min**2 + 2.0 * beta_d * jnp.log1p(jnp.square(sigma))) - beta_min) / beta_d


def churn_gamma(num_steps: int, s_churn: float) -> float:
  """EDM Algorithm 2's gamma for sigma in [S_tmin, S_tmax]: min(S_churn / N, sqrt(2) - 1)."""
  return min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
