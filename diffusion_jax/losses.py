"""Training losses, timestep samplers and the likelihood in bits/dim.

Ho et al. 2020 (L_simple, the variational bound) and Nichol & Dhariwal 2021
(L_hybrid, learned variances, loss-aware timestep sampling, NLL tables). The
model is a plain callable `model_fn(x_t, t) -> output`; nothing here knows Flax.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
LOG2 = math.log(2.0)


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------- densities


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise."""
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def _approx_cdf_logit(x):
  """The reference code's tanh approximation of the normal CDF is sigmoid(this)."""
  return 2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)


def approx_standard_normal_cdf(x):
  """Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the reference code's approximation."""
  return jax.nn.sigmoid(_approx_cdf_logit(x))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) of data on the 256-level grid of [-1, 1] under N(means, e^{2 log_scales}).

  Ho et al. eq. 13: the decoder's mass on the bin [x - 1/255, x + 1/255],
  with the edge bins reaching to -inf and +inf. Natural log, elementwise.
  With Phi(z) ~ sigmoid(u(z)), the bin's mass sigmoid(u) - sigmoid(l) is
  computed as sigmoid(u) sigmoid(-l) (1 - e^{l-u}) in log space, which keeps
  full precision in both tails, where the difference of two CDFs cancels.
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  upper = _approx_cdf_logit(inv_stdv * (centered + 1.0 / 255.0))
  lower = _approx_cdf_logit(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_upper = jax.nn.log_sigmoid(upper)  # log Phi(upper edge)
  log_sf_lower = jax.nn.log_sigmoid(-lower)  # log (1 - Phi(lower edge))
  log_bin = log_cdf_upper + log_sf_lower + jnp.log(-jnp.expm1(lower - upper))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_bin))


# ----------------------------------------------------------------------------- bound terms


def vb_term_bits(
  spec: ModelSpec, schedule: Schedule, model_output, x_start, x_t, t, clip_x0: bool = False
):
  """L_{t-1} of the variational bound (Ho et al. eq. 5) in bits/dim: [B].

  KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, and the decoder's
  -log p(x_0|x_1) for t = 0. By default x_0 is not clipped: the bound is of
  the model itself; `clip_x0` bounds the clipped-x_0 sampler instead.
  """
  true_mean, _, true_log_var = diffusion.q_posterior(schedule, x_start, x_t, t)
  p = diffusion.p_mean_variance(spec, schedule, model_output, x_t, t, clip_x0=clip_x0)
  kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / LOG2
  decoder_nll = (
    -mean_flat(discretized_gaussian_log_likelihood(x_start, p.mean, 0.5 * p.log_variance)) / LOG2
  )
  return jnp.where(t == 0, decoder_nll, kl)


def prior_bits(schedule: Schedule, x_start):
  """KL(q(x_T | x_0) || N(0, I)) in bits/dim, the bound's L_T: [B]."""
  t = jnp.full(x_start.shape[:1], schedule.num_timesteps - 1, jnp.int32)
  mean, _, log_var = diffusion.q_mean_variance(schedule, x_start, t)
  return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / LOG2


# ----------------------------------------------------------------------------- training


class LossType(str, enum.Enum):
  SIMPLE = "simple"  # Ho et al. eq. 14: MSE on the mean target
  HYBRID = "hybrid"  # Improved DDPM sec. 3.1: L_simple + lambda L_vlb, lambda = 0.001
  VLB = "vlb"  # the variational bound alone, T * L_t (an estimate of the full bound)


HYBRID_LAMBDA = 0.001


class LossTerms(NamedTuple):
  """Per-example terms, each [B]: the loss to minimise, its MSE and bound parts."""

  loss: jax.Array
  mse: jax.Array
  vb: jax.Array  # L_t in bits/dim (0 for L_simple)


def min_snr_weights(spec: ModelSpec, schedule: Schedule, t, gamma: float) -> jax.Array:
  """Min-SNR-gamma weights of the MSE at timesteps t [B] (Hang et al. 2023): [B].

  With SNR_t = abar_t / (1 - abar_t), the x_0-space weight min(SNR_t, gamma)
  written for the network's target, whose MSE is SNR_t (epsilon) or
  SNR_t + 1 (v) times the x_0 one:
    epsilon: min(SNR_t, gamma) / SNR_t
    v:       min(SNR_t, gamma) / (SNR_t + 1)
    x0:      min(SNR_t, gamma), the paper's definition itself
  so all three minimise the same objective.
  """
  snr = 1.0 / jnp.square(schedule.sqrt_recipm1_alphas_cumprod[t])  # float64-exact terms
  clipped = jnp.minimum(snr, gamma)
  if spec.mean_type is diffusion.MeanType.EPSILON:
    return clipped / snr
  if spec.mean_type is diffusion.MeanType.V:
    return clipped / (snr + 1.0)
  return clipped


def training_losses(
  model_fn: ModelFn,
  spec: ModelSpec,
  schedule: Schedule,
  loss_type,
  x_start,
  t,
  noise,
  *,
  min_snr_gamma: float | None = None,
) -> LossTerms:
  """The per-example training loss at timesteps t [B] for noise eps [B, H, W, C].

  L_hybrid = L_simple + lambda * L_vlb (Improved DDPM sec. 3.1) with
  L_vlb estimated as T * L_t, i.e. L_t * T / 1000 for lambda = 0.001, and
  the mean's gradient stopped in the bound term, so that L_vlb trains only
  the variance. With `min_snr_gamma`, the MSE term of the loss is weighted by
  `min_snr_weights` (the returned `mse` stays unweighted, for logging).
  """
  loss_type = diffusion.parse_enum(LossType, loss_type, "loss_type")
  _check_discrete_time(spec, "training_losses")
  _check_loss_fits(loss_type, spec)
  if min_snr_gamma is not None and loss_type is LossType.VLB:
    raise ValueError("min-SNR weighting weights the MSE, which loss 'vlb' does not use.")
  x_t = diffusion.q_sample(schedule, x_start, t, noise)
  output = model_fn(x_t, t)
  mean_output, var_output = diffusion.split_output(spec, output)
  target = diffusion.mean_target(spec, schedule, x_start, t, noise)
  mse = mean_flat(jnp.square(target - mean_output))
  weighted_mse = (
    mse if min_snr_gamma is None else (min_snr_weights(spec, schedule, t, min_snr_gamma) * mse)
  )
  num_timesteps = schedule.num_timesteps
  if loss_type is LossType.SIMPLE:
    return LossTerms(weighted_mse, mse, jnp.zeros_like(mse))
  if loss_type is LossType.HYBRID:
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
    vb = vb_term_bits(spec, schedule, frozen, x_start, x_t, t)
    return LossTerms(weighted_mse + HYBRID_LAMBDA * num_timesteps * vb, mse, vb)
  vb = vb_term_bits(spec, schedule, output, x_start, x_t, t)
  return LossTerms(num_timesteps * vb, mse, vb)


def _check_discrete_time(spec: ModelSpec, name: str):
  if spec.edm is not None:
    raise ValueError(
      f"{name} reads a discrete-time model's output; this model is"
      " EDM-preconditioned (use edm.training_losses; it has no DDPM bound)."
    )


def _check_loss_fits(loss_type: LossType, spec: ModelSpec):
  if loss_type is LossType.SIMPLE and spec.learns_variance:
    raise ValueError(
      f"loss 'simple' leaves the {spec.var_type.value!r} variance untrained;"
      " use loss 'hybrid' or 'vlb'."
    )
  if loss_type is LossType.HYBRID and not spec.learns_variance:
    raise ValueError(
      "loss 'hybrid' needs a learned variance (var_type 'learned' or"
      f" 'learned_range'), got {spec.var_type.value!r}."
    )


# ----------------------------------------------------------------------------- timestep samplers


@dataclasses.dataclass(frozen=True)
class UniformSampler:
  """t ~ U{0, ..., T-1} with unit importance weights (Ho et al. Algorithm 1)."""

  num_timesteps: int

  def init(self) -> tuple:
    return ()

  def sample(self, state, key, batch_size: int):
    """-> (t int32 [B], importance weights float32 [B])."""
    del state
    t = jax.random.randint(key, (batch_size,), 0, self.num_timesteps)
    return t, jnp.ones((batch_size,), jnp.float32)

  def update(self, state, t, losses):
    del t, losses
    return state

  def quarter(self, t: jax.Array) -> jax.Array:
    """int32 [B]: the quarter of [0, T) each timestep t [B] lies in (0..3), for the metrics."""
    return t * 4 // self.num_timesteps


class LossHistory(NamedTuple):
  """The last K losses seen at each timestep: history [T, K], counts [T]."""

  history: jax.Array
  counts: jax.Array


@dataclasses.dataclass(frozen=True)
class LossAwareSampler:
  """Improved DDPM sec. 3.3: p_t proportional to sqrt(E[L_t^2]) over the last K losses.

  Uniform until every t has K losses; then mixed with `uniform_prob` of the
  uniform distribution. Importance weights 1 / (T p_t) keep the loss unbiased.
  """

  num_timesteps: int
  history_per_term: int = 10
  uniform_prob: float = 0.001

  def init(self) -> LossHistory:
    return LossHistory(
      jnp.zeros((self.num_timesteps, self.history_per_term), jnp.float32),
      jnp.zeros((self.num_timesteps,), jnp.int32),
    )

  def probabilities(self, state: LossHistory) -> jax.Array:
    """p_t [T]: uniform while warming up, else the mixed second-moment rule."""
    uniform = jnp.full((self.num_timesteps,), 1.0 / self.num_timesteps)
    weights = jnp.sqrt(jnp.mean(jnp.square(state.history), axis=-1))
    weights = weights / jnp.sum(weights)
    mixed = weights * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
    warm = jnp.all(state.counts >= self.history_per_term)
    return jnp.where(warm, mixed, uniform)

  def sample(self, state: LossHistory, key, batch_size: int):
    """-> (t int32 [B], importance weights float32 [B])."""
    p = self.probabilities(state)
    t = jax.random.choice(key, self.num_timesteps, (batch_size,), p=p)
    return t.astype(jnp.int32), 1.0 / (self.num_timesteps * p[t])

  quarter = UniformSampler.quarter

  def update(self, state: LossHistory, t, losses) -> LossHistory:
    """Pushes each example's loss into its timestep's history, oldest dropped, in batch order."""

    def push(state, t_and_loss):
      t, loss = t_and_loss
      row = jnp.roll(state.history[t], -1).at[-1].set(loss)
      return LossHistory(state.history.at[t].set(row), state.counts.at[t].add(1)), None

    state, _ = jax.lax.scan(push, state, (t, jax.lax.stop_gradient(losses)))
    return state


TIMESTEP_SAMPLERS = {"uniform": UniformSampler, "loss_aware": LossAwareSampler}


def get_timestep_sampler(name: str, num_timesteps: int):
  """The named timestep sampler ("uniform" or "loss_aware") over T steps."""
  if name not in TIMESTEP_SAMPLERS:
    raise ValueError(f"Unknown timestep sampler {name!r}; known: {sorted(TIMESTEP_SAMPLERS)}.")
  return TIMESTEP_SAMPLERS[name](num_timesteps)


# ----------------------------------------------------------------------------- likelihood


class NLLResult(NamedTuple):
  """The full variational bound (Ho et al. eq. 5) in bits/dim, with its parts."""

  total_bpd: jax.Array  # [B] = prior + sum_t vb
  prior_bpd: jax.Array  # [B] L_T
  vb: jax.Array  # [B, T] L_{t-1}, in bits/dim, t = 0..T-1
  x0_mse: jax.Array  # [B, T] squared error of the predicted x_0
  mse: jax.Array  # [B, T] squared error of the predicted eps


def nll_bpd(
  model_fn: ModelFn, spec: ModelSpec, schedule: Schedule, x_start, key, *, clip_x0: bool = False
) -> NLLResult:
  """Negative log-likelihood bound of x_start [B, H, W, C] in bits/dim, over all T steps.

  One compiled loop over t with fresh noise per step, as for the NLL tables
  of Improved DDPM (sec. 3.2). x_start must be on the 256-level grid of [-1, 1].

  Args:
    clip_x0: clip the predicted x_0 to [-1, 1] inside the bound, as Improved
      DDPM's published protocol does (`image_nll.py` runs `calc_bpd_loop` with
      `clip_denoised=True`): the bound of the clipped sampler. False (the
      default) gives the bound of the model's own p(x_{t-1} | x_t).
  """
  _check_discrete_time(spec, "nll_bpd")
  batch = x_start.shape[0]

  def step(carry, t_and_key):
    t_scalar, key = t_and_key
    t = jnp.full((batch,), t_scalar, jnp.int32)
    noise = jax.random.normal(key, x_start.shape, x_start.dtype)
    x_t = diffusion.q_sample(schedule, x_start, t, noise)
    output = model_fn(x_t, t)
    vb = vb_term_bits(spec, schedule, output, x_start, x_t, t, clip_x0)
    mean_output, _ = diffusion.split_output(spec, output)
    pred_x0 = diffusion.predict_x0(spec, schedule, mean_output, x_t, t)
    if clip_x0:
      pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    pred_eps = diffusion.eps_from_x0(schedule, x_t, t, pred_x0)
    return carry, (
      vb,
      mean_flat(jnp.square(pred_x0 - x_start)),
      mean_flat(jnp.square(pred_eps - noise)),
    )

  ts = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
  keys = jax.random.split(key, schedule.num_timesteps)
  _, (vb, x0_mse, mse) = jax.lax.scan(step, None, (ts, keys))
  vb, x0_mse, mse = vb.T, x0_mse.T, mse.T  # [T, B] -> [B, T]
  prior = prior_bits(schedule, x_start)
  return NLLResult(prior + jnp.sum(vb, axis=1), prior, vb, x0_mse, mse)
