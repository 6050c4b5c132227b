"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, sec. 4.3 and App. D.2).

For the VP SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, every marginal p_t
is also transported by the ODE

    dx/dt = f~(x, t) = -1/2 beta(t) (x + score(x, t)),   score = grad_x log p_t,

and along its solution the density obeys the instantaneous change of
variables d log p_t(x_t) / dt = -div f~(x_t, t) (Chen et al. 2018), so

    log p_eps(x) = log p_T(x_T) + int_eps^T div f~(x_t, t) dt,

x_t the solution from x_eps = x, T = 1 (or 1 - 1/T for the cosine schedule).
Solved forward in t as one ODE in (x, delta): delta(T) is the integral, and
p_T is taken to be N(0, I). With the model's
score in place of the true one, this is the exact density of the model's
continuous normalising flow. The divergence is the trace of the Jacobian of
f~: exactly (D forward-mode products, small D), or Hutchinson-Skilling's
unbiased estimate eps^T J eps with eps fixed over the solve (Grathwohl et
al. 2019), averaged over `probes` Rademacher or Gaussian draws.

A discrete-time model of the DDPM family enters as score_sde's likelihood
does for its DDPM models (`likelihood.py`: `get_score_fn(continuous=True)`):
linear betas of T steps from beta_min / T to beta_max / T are the VP SDE with
beta(t) = beta_min + t (beta_max - beta_min) (Song et al. eq. 33), the network
is called at the timestep t (T - 1), a float, and its output is read with the
SDE's own alpha(t), sigma(t): score = -eps_hat / sigma(t). The cosine schedule
(which score_sde never had) is its own VP SDE, `CosineVPSDE`. The bits/dim of
images on the 256-level grid follow from a dequantisation (`dequantize`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import configlib, diffusion, ode, schedules
from diffusion_jax.diffusion import MeanType, ModelSpec
from diffusion_jax.schedules import Schedule

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], t float [B]) -> score
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, ...], timesteps float [B])

DIVERGENCES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")
DEQUANTISATIONS = ("uniform", "centered", "none")


# ----------------------------------------------------------------------------- the SDE


class _VP:
  """What every VP SDE here shares: x_t = alpha(t) x_0 + sigma(t) eps, alpha^2 + sigma^2 = 1."""

  def alpha_sigma(self, t):
    """(alpha(t), sigma(t) = sqrt(1 - alpha^2)), sigma by expm1: exact near t = 0 in float32."""
    log_alpha = self.log_alpha(t)
    return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))


@dataclasses.dataclass(frozen=True)
class VPSDE(_VP):
  """Song et al. 2021's VP SDE, beta(t) = beta_min + t (beta_max - beta_min), on [t_min, 1].

  The discretisation of DDPM's linear schedule at T steps; its network is
  called at timestep t (T - 1), score_sde's `labels = t * 999` at T = 1000.
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  t_min: float = 1e-5  # score_sde integrates from eps = 1e-5 "for numerical stability"
  num_timesteps: int = 1000
  t_max: float = 1.0

  def beta(self, t):
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def log_alpha(self, t):
    """log alpha(t), alpha(t)^2 = abar(t) = exp(-int_0^t beta)."""
    return -0.25 * jnp.square(t) * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def timestep(self, t):
    return t * (self.num_timesteps - 1)


@dataclasses.dataclass(frozen=True)
class CosineVPSDE(_VP):
  """The VP SDE of Nichol & Dhariwal's cosine schedule (eq. 17), on [t_min, 1 - 1/T].

  abar(t) = f(t) / f(0), f(t) = cos^2(theta(t)), theta = (t + s) / (1 + s) pi/2,
  beta(t) = -d log abar / dt = pi / (1 + s) tan(theta). The discrete schedule
  is abar_i = abar((i + 1) / T): the network is called at timestep t T - 1
  (clipped at 0), exactly its training noise level at every timestep. abar
  reaches 0 at t = 1, where beta is infinite (the discrete schedule clips its
  last beta at 0.999 instead), so the ODE ends at t = 1 - 1/T, timestep T - 2,
  the last unclipped one: abar = 2.4e-6 at T = 1000, where p_t is N(0, I)
  closer than the linear SDE's p_1 (abar(1) = 4.3e-5).
  """

  s: float = 0.008
  t_min: float = 1e-5
  num_timesteps: int = 1000

  @property
  def t_max(self) -> float:
    return 1.0 - 1.0 / self.num_timesteps

  def _theta(self, t):
    return (t + self.s) / (1.0 + self.s) * (math.pi / 2)

  def beta(self, t):
    return math.pi / (1.0 + self.s) * jnp.tan(self._theta(t))

  def log_alpha(self, t):
    """log cos(theta0 + d) / cos(theta0) = log1p(-2 sin^2(d/2) - tan(theta0) sin d).

    Not log cos(theta) - log cos(theta0): float32 rounds cos near 1 by 6e-8,
    which is 30% of sigma^2 at t = 1e-5.
    """
    d = t / (1.0 + self.s) * (math.pi / 2)
    return jnp.log1p(-2.0 * jnp.square(jnp.sin(d / 2)) - math.tan(self._theta(0.0)) * jnp.sin(d))

  def timestep(self, t):
    return jnp.maximum(t * self.num_timesteps - 1.0, 0.0)


def vp_sde_of(schedule: Schedule, t_min: float = 1e-5) -> VPSDE | CosineVPSDE:
  """The VP SDE whose discretisation is `schedule`: linear or cosine betas of T steps.

  Linear: betas_i = beta_min / T + i / (T - 1) (beta_max - beta_min) / T, so
  beta_min = T betas_0 and beta_max = T betas_{T-1} (0.1 and 20 for DDPM's
  schedule at any T): score_sde's mapping. Cosine: `CosineVPSDE`. Others
  (quadratic, sigmoid, respaced, foreign) are refused by name.
  """
  betas = np.asarray(schedule.betas, np.float64)
  T = betas.size
  if T >= 2 and np.allclose(betas, np.linspace(betas[0], betas[-1], T), rtol=1e-5, atol=0.0):
    return VPSDE(
      beta_min=float(betas[0] * T), beta_max=float(betas[-1] * T), t_min=t_min, num_timesteps=T
    )
  if T >= 2 and np.allclose(betas, schedules.cosine_betas(T), rtol=1e-4, atol=1e-7):
    return CosineVPSDE(t_min=t_min, num_timesteps=T)
  raise ValueError(
    "nll_ode maps a linear beta schedule (as score_sde does) or the cosine one to"
    " a VP SDE; this schedule's betas are neither (quadratic, sigmoid, respaced or"
    " foreign), and no VP SDE is defined for them here."
  )


def per_example(values: jax.Array, ndim: int) -> jax.Array:
  return jnp.reshape(values, values.shape + (1,) * (ndim - values.ndim))


def score_from_model(model_fn: ModelFn, spec: ModelSpec, sde: VPSDE | CosineVPSDE) -> ScoreFn:
  """score(x, t) of a network of the project, as score_sde reads its DDPM models.

  The network is called at timesteps `sde.timestep(t)` (floats; `rescale_timesteps`
  and the like are `model_fn`'s business, as for the samplers) and its mean
  output read with alpha(t), sigma(t) of `sde`: eps_hat is the output (eps),
  (x - alpha x0_hat) / sigma (x0), or sigma x + alpha v_hat (v); score =
  -eps_hat / sigma. A learned variance is ignored; x_0 is never clipped (the
  ODE needs a smooth field). An EDM-preconditioned network (spec.edm) is
  D(y; s) at s = sigma / alpha, y = x / alpha: score = (alpha D - x) / sigma^2.
  """

  def score(x, t):
    alpha_t, sigma_t = sde.alpha_sigma(t)  # [B]
    alpha, sigma = per_example(alpha_t, x.ndim), per_example(sigma_t, x.ndim)
    if spec.edm is not None:
      denoised = spec.edm.denoise(model_fn, x / alpha, sigma_t / alpha_t)
      return (alpha * denoised - x) / jnp.square(sigma)
    output, _ = diffusion.split_output(spec, model_fn(x, sde.timestep(t)))
    if spec.mean_type is MeanType.EPSILON:
      eps = output
    elif spec.mean_type is MeanType.X0:
      eps = (x - alpha * output) / sigma
    else:
      eps = sigma * x + alpha * output
    return -eps / sigma

  return score


def probability_flow(score_fn: ScoreFn, sde: VPSDE | CosineVPSDE):
  """f~(x, t) = -1/2 beta(t) (x + score(x, t)) for x [B, ...] and a scalar t."""

  def drift(x, t):
    t = jnp.full(x.shape[:1], t, jnp.float32)
    return -0.5 * per_example(sde.beta(t), x.ndim) * (x + score_fn(x, t))

  return drift


# ----------------------------------------------------------------------------- divergence


def draw_probes(key: jax.Array, shape: tuple[int, ...], kind: str, count: int) -> jax.Array:
  """[count, *shape] Hutchinson probes, E[eps eps^T] = I: Rademacher (+-1) or standard normal."""
  if kind == "rademacher":
    return jax.random.rademacher(key, (count, *shape), jnp.float32)
  if kind == "gaussian":
    return jax.random.normal(key, (count, *shape), jnp.float32)
  raise ValueError(f"Unknown probe {kind!r}; known: {list(PROBES)}.")


def drift_and_divergence(
  fn: Callable[[jax.Array], jax.Array], x: jax.Array, probes: jax.Array | None
):
  """(fn(x) [B, ...], div fn(x) [B]) for a map fn that treats each example of x alone.

  `probes` [K, B, ...]: Hutchinson-Skilling, mean_k eps_k^T J eps_k, each by
  one forward-mode product. None: the exact trace, sum_j (J e_j)_j over the D
  basis vectors e_j (each put in every example at once: J is block-diagonal
  over the batch), D products; for small D.
  """
  value, jvp = jax.linearize(fn, x)
  flat = lambda a: a.reshape(a.shape[0], -1)
  if probes is not None:
    products = jax.vmap(jvp)(probes) * probes  # [K, B, ...]
    return value, jnp.mean(jnp.sum(products.reshape(*probes.shape[:2], -1), -1), 0)
  dims = math.prod(x.shape[1:])
  basis = jnp.eye(dims, dtype=x.dtype)  # [D, D]

  def diagonal_entry(e_j):
    tangent = jnp.broadcast_to(e_j, (x.shape[0], dims)).reshape(x.shape)
    return jnp.sum(flat(jvp(tangent)) * e_j, axis=-1)  # [B]: (J e_j)_j

  return value, jnp.sum(jax.lax.map(diagonal_entry, basis), axis=0)


# ----------------------------------------------------------------------------- likelihood


@dataclasses.dataclass(frozen=True, kw_only=True)
class DivergenceConfig:
  """The divergence: "exact" (small D) or "hutchinson" with `probes` draws of kind `probe`."""

  divergence: str = "hutchinson"
  probe: str = "rademacher"  # score_sde's default
  probes: int = 1  # score_sde draws one per example

  def __post_init__(self):
    for name, value, known in (
      ("divergence", self.divergence, DIVERGENCES),
      ("probe", self.probe, PROBES),
    ):
      if value not in known:
        raise ValueError(f"Unknown {name} {value!r}; known: {list(known)}.")
    configlib.check_ranges(self, "divergence", {"probes": configlib.AT_LEAST_ONE})


class Likelihood(NamedTuple):
  """log p_eps(x) in nats of each example, its parts, and the solver's cost."""

  log_p: jax.Array  # [B] = prior_log_p + delta_log_p
  prior_log_p: jax.Array  # [B] log N(x_1; 0, I)
  delta_log_p: jax.Array  # [B] int_eps^1 div f~ dt
  z: jax.Array  # [B, ...] x_1, the latent
  solution: ode.Solution  # counters: nfe (each one network call and its divergence), steps


def log_likelihood(
  score_fn: ScoreFn,
  sde: VPSDE | CosineVPSDE,
  x: jax.Array,
  key: jax.Array,
  *,
  divergence: DivergenceConfig = DivergenceConfig(),
  solver: ode.SolverConfig = ode.SolverConfig(),
  weights: jax.Array | None = None,
  probes: jax.Array | None = None,
  prior_log_p: Callable[[jax.Array], jax.Array] | None = None,
) -> Likelihood:
  """log p(x) [B] of continuous data x [B, ...] under the probability-flow ODE of `score_fn`.

  Args:
    key: the Hutchinson probes' key: [B] typed keys (`jax.random.key`), one
      per example, so that an example's probes do not depend on its batch;
      or one key for the whole batch.
    weights: [B] weights of the examples in the solver's error norm (0 for
      padding); None: all 1.
    probes: [K, B, ...] Hutchinson probes to use instead of drawing them.
    prior_log_p: log p_1(z) [B] of z [B, ...]; None: N(0, I), score_sde's.
  """
  if divergence.divergence == "exact":
    probes = None
  elif probes is None:
    if _per_example(key):
      probes = jax.vmap(
        lambda k: draw_probes(k, x.shape[1:], divergence.probe, divergence.probes), out_axes=1
      )(key)
    else:
      probes = draw_probes(key, x.shape, divergence.probe, divergence.probes)
  drift = probability_flow(score_fn, sde)

  def rhs(t, state):
    x_t, _ = state
    return drift_and_divergence(lambda y: drift(y, t), x_t, probes)

  y0 = (x, jnp.zeros(x.shape[:1], jnp.float32))
  solution = ode.solve(rhs, y0, sde.t_min, sde.t_max, solver, norm=_weighted_rms(weights))
  z, delta = solution.y
  prior = (prior_log_p or standard_normal_log_p)(z)
  return Likelihood(prior + delta, prior, delta, z, solution)


def standard_normal_log_p(z: jax.Array) -> jax.Array:
  """log N(z; 0, I) [B] of z [B, ...]."""
  dims = math.prod(z.shape[1:])
  return -0.5 * dims * math.log(2 * math.pi) - 0.5 * jnp.sum(
    jnp.square(z).reshape(z.shape[0], -1), axis=-1
  )


def _per_example(key: jax.Array) -> bool:
  """Whether `key` is [B] typed keys (one per example) rather than one key."""
  return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def _weighted_rms(weights: jax.Array | None) -> ode.NormFn:
  """The RMS over every element of the state, example b's elements weighted by weights[b]."""
  if weights is None:
    return ode.rms_norm

  def norm(tree):
    total, count = 0.0, 0.0
    for leaf in jax.tree.leaves(tree):
      per_example_count = math.prod(leaf.shape[1:])
      squares = jnp.sum(jnp.square(leaf).reshape(leaf.shape[0], -1), -1)
      total += jnp.sum(jnp.where(weights > 0, weights * squares, 0.0))  # inf padding too
      count += jnp.sum(weights) * per_example_count
    return jnp.sqrt(total / count)

  return norm


# ----------------------------------------------------------------------------- bits/dim


def dequantize(images: jax.Array, key: jax.Array, mode: str) -> tuple[jax.Array, float]:
  """(continuous data x, offset in bits/dim) for images [B, ...] on the grid k / 127.5 - 1.

  With k = 0..255 the pixel value and u ~ U[0, 1)^D:
    "uniform" (score_sde's): x = 2 (k + u) / 256 - 1, bins of width 2/256 tiling [-1, 1);
    "centered": x = (k + u - 1/2) / 127.5 - 1, bins of width 2/255 centred on the grid;
    "none": x = the grid point itself (no bound: a density is not a probability).
  For a bin width w, P(k) >= w^D exp(E_u log p(x)) (Jensen), so
  bits/dim = -E_u log p(x) / (D ln 2) + offset with offset = -log2 w: 7 for
  "uniform", log2(127.5) for "centered" and "none". `key`: [B] typed keys or one.
  """
  if mode not in DEQUANTISATIONS:
    raise ValueError(f"Unknown dequantisation {mode!r}; known: {list(DEQUANTISATIONS)}.")
  if mode == "none":
    return images, math.log2(127.5)
  k = jnp.round((images + 1.0) * 127.5)
  if _per_example(key):
    u = jax.vmap(lambda k_: jax.random.uniform(k_, images.shape[1:]))(key)
  else:
    u = jax.random.uniform(key, images.shape)
  if mode == "uniform":
    return (k + u) / 128.0 - 1.0, 7.0
  return (k + u - 0.5) / 127.5 - 1.0, math.log2(127.5)


def bits_per_dim(log_p: jax.Array, dims: int, offset: float) -> jax.Array:
  """-log p / (D ln 2) + offset: the NLL in bits/dim of the grid data (`dequantize`'s offset)."""
  return -log_p / (dims * math.log(2.0)) + offset
