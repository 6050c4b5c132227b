"""Losses, timestep samplers and the NLL bound against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, losses, schedules
from diffusion_jax.diffusion import ModelSpec

SCHED = schedules.get_schedule("linear", 1000)


def test_normal_kl_closed_form():
  m1, s1, m2, s2 = 0.3, 0.7, -0.2, 1.3
  expected = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
  got = losses.normal_kl(m1, 2 * math.log(s1), m2, 2 * math.log(s2))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_allclose(losses.normal_kl(jnp.ones(3), 0.4, jnp.ones(3), 0.4), 0.0, atol=1e-7)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.97, -5.0), (-1.0, 0.5)])
def test_discretized_decoder_bins_sum_to_one(mean, log_scale):
  grid = jnp.arange(256) / 127.5 - 1.0
  log_p = losses.discretized_gaussian_log_likelihood(grid, mean, log_scale)
  np.testing.assert_allclose(jnp.sum(jnp.exp(log_p)), 1.0, rtol=1e-4)


def test_standard_normal_cdf_approximation():
  x = np.linspace(-3, 3, 13)
  exact = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  np.testing.assert_allclose(losses.approx_standard_normal_cdf(x), exact, atol=2e-3)


def _noise_model(noise, var_channels=None):
  """A model that outputs the true noise (and, optionally, variance channels)."""

  def model_fn(x_t, t):
    del t
    if var_channels is None:
      return noise
    return jnp.concatenate([noise, jnp.full_like(x_t, var_channels)], -1)

  return model_fn


@pytest.mark.parametrize(
  "loss_type,var_type", [("simple", "fixed_small"), ("hybrid", "learned_range")]
)
def test_loss_of_true_noise_model(loss_type, var_type):
  spec = ModelSpec(var_type=var_type)
  k0, k1 = jax.random.split(jax.random.key(0))
  x0 = jax.random.uniform(k0, (6, 4, 4, 3), minval=-1, maxval=1)
  noise = jax.random.normal(k1, x0.shape)
  t = jnp.array([0, 1, 5, 100, 500, 999])
  model = _noise_model(noise, None if var_type == "fixed_small" else -1.0)
  terms = losses.training_losses(model, spec, SCHED, loss_type, x0, t, noise)
  np.testing.assert_allclose(terms.mse, 0.0, atol=1e-12)
  if loss_type == "simple":
    np.testing.assert_allclose(terms.loss, 0.0, atol=1e-12)
  else:  # the true mean with v=-1 (posterior variance) makes every KL term 0.
    np.testing.assert_allclose(terms.vb[1:], 0.0, atol=1e-4)


def test_hybrid_bound_does_not_reach_the_mean():
  spec = ModelSpec(var_type="learned_range")
  x0 = jax.random.uniform(jax.random.key(0), (4, 4, 4, 1), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([3, 30, 300, 900])

  def loss(params, loss_type):
    model = lambda x_t, t: jnp.concatenate(
      [params["a"] * x_t, params["b"] * jnp.ones_like(x_t)], -1
    )
    return losses.training_losses(model, spec, SCHED, loss_type, x0, t, noise)

  params = {"a": 0.3, "b": 0.2}
  hybrid_grads = jax.grad(lambda p: loss(p, "hybrid").loss.mean())(params)
  mse_grads = jax.grad(lambda p: loss(p, "hybrid").mse.mean())(params)
  vlb_grads = jax.grad(lambda p: loss(p, "vlb").loss.mean())(params)
  np.testing.assert_allclose(hybrid_grads["a"], mse_grads["a"], rtol=1e-6)
  assert abs(float(hybrid_grads["b"])) > 1e-3  # the bound trains the variance
  assert abs(float(vlb_grads["a"] - mse_grads["a"])) > 1e-3  # L_vlb alone reaches the mean


@pytest.mark.parametrize("num_timesteps", [1000, 4000])  # lambda T = 1 and 4
def test_hybrid_scales_vlb_by_lambda_times_T(num_timesteps):
  spec = ModelSpec(var_type="learned_range")
  x0 = jax.random.uniform(jax.random.key(0), (3, 2, 2, 1), minval=-1, maxval=1)
  noise = jnp.zeros_like(x0)
  t = jnp.array([10, 20, 30])
  model = lambda x_t, t: jnp.concatenate([x_t, jnp.zeros_like(x_t)], -1)
  schedule = schedules.get_schedule("cosine", num_timesteps)
  terms = losses.training_losses(model, spec, schedule, "hybrid", x0, t, noise)
  assert np.all(terms.vb > 0)
  np.testing.assert_allclose(terms.loss, terms.mse + 0.001 * num_timesteps * terms.vb, rtol=1e-6)


# Independent of the library: SNR_t = abar_t / (1 - abar_t) of Ho et al.'s linear betas, float64.
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
MIN_SNR_FORMULA = {  # Hang et al. 2023 for each target, gamma = 5
  "epsilon": lambda snr: np.minimum(snr, 5.0) / snr,
  "v": lambda snr: np.minimum(snr, 5.0) / (snr + 1.0),
  "x0": lambda snr: np.minimum(snr, 5.0),
}


@pytest.mark.parametrize("mean_type", sorted(MIN_SNR_FORMULA))
def test_min_snr_weights_follow_the_formula(mean_type):
  t = np.array([0, 50, 150, 300, 999])  # SNR from ~1e4 through gamma = 5 to ~4e-5
  snr = ABAR[t] / (1.0 - ABAR[t])
  assert snr[1] > 5.0 > snr[2]
  spec = ModelSpec(mean_type=mean_type)
  weights = losses.min_snr_weights(spec, SCHED, jnp.asarray(t), 5.0)
  np.testing.assert_allclose(weights, MIN_SNR_FORMULA[mean_type](snr), rtol=1e-5)

  x0 = jax.random.uniform(jax.random.key(0), (5, 2, 2, 1), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  model = lambda x_t, t: 0.5 * x_t
  terms = losses.training_losses(
    model, spec, SCHED, "simple", x0, jnp.asarray(t), noise, min_snr_gamma=5.0
  )
  np.testing.assert_allclose(terms.loss, weights * terms.mse, rtol=1e-6)
  with pytest.raises(ValueError, match="'vlb' does not use"):
    losses.training_losses(model, spec, SCHED, "vlb", x0, jnp.asarray(t), noise, min_snr_gamma=5.0)


def test_loss_type_must_fit_the_variance():
  x = jnp.zeros((1, 2, 2, 1))
  model = lambda x_t, t: x_t
  with pytest.raises(ValueError, match="hybrid"):
    losses.training_losses(model, ModelSpec(), SCHED, "hybrid", x, jnp.array([1]), x)
  with pytest.raises(ValueError, match="untrained"):
    losses.training_losses(
      model, ModelSpec(var_type="learned"), SCHED, "simple", x, jnp.array([1]), x
    )
  with pytest.raises(ValueError, match="loss_type 'l2'"):
    losses.training_losses(model, ModelSpec(), SCHED, "l2", x, jnp.array([1]), x)


def test_uniform_sampler():
  sampler = losses.get_timestep_sampler("uniform", 50)
  t, w = jax.jit(sampler.sample, static_argnums=2)(sampler.init(), jax.random.key(0), 4096)
  assert int(t.min()) == 0 and int(t.max()) == 49
  np.testing.assert_array_equal(w, 1.0)


def test_loss_aware_sampler_follows_second_moments():
  T, K = 4, 3
  sampler = losses.LossAwareSampler(T, history_per_term=K)
  state = sampler.init()
  np.testing.assert_allclose(sampler.probabilities(state), 1 / T)
  losses_per_t = np.array([1.0, 2.0, 4.0, 8.0])
  t = jnp.repeat(jnp.arange(T), K + 1)  # K+1 pushes per t: the oldest is dropped
  values = jnp.asarray(np.repeat(losses_per_t, K + 1)).at[:: K + 1].set(100.0)
  state = jax.jit(sampler.update)(state, t, values)
  np.testing.assert_array_equal(state.counts, K + 1)
  np.testing.assert_allclose(state.history, np.repeat(losses_per_t[:, None], K, 1))
  expected = losses_per_t / losses_per_t.sum() * (1 - 0.001) + 0.001 / T
  np.testing.assert_allclose(sampler.probabilities(state), expected, rtol=1e-5)
  ts, w = sampler.sample(state, jax.random.key(0), 20000)
  np.testing.assert_allclose(np.bincount(ts, minlength=T) / 20000, expected, atol=0.015)
  # Importance weights make the weighted loss unbiased for the uniform mean.
  np.testing.assert_allclose(
    np.mean(np.asarray(w) * losses_per_t[ts]), losses_per_t.mean(), rtol=0.03
  )


def test_unknown_timestep_sampler():
  with pytest.raises(ValueError, match="loss_aware"):
    losses.get_timestep_sampler("importance", 10)


def _point_mass_models(c):
  """For data always equal to c: the exactly optimal eps model, and a wrong one."""
  sched = schedules.get_schedule("linear", 100)

  def optimal(x_t, t):
    abar = sched.alphas_cumprod[t][:, None, None, None]
    return (x_t - jnp.sqrt(abar) * c) / jnp.sqrt(1 - abar)

  return sched, optimal, lambda x_t, t: jnp.zeros_like(x_t)


def test_nll_of_optimal_model_is_finite_and_beats_a_wrong_model():
  c = 0.2 - 0.2 % (2 / 255)  # on the 256-level grid
  x0 = jnp.full((2, 4, 4, 3), c)
  sched, optimal, wrong = _point_mass_models(c)
  spec = ModelSpec(clip_x0=False)
  nll = jax.jit(lambda x: losses.nll_bpd(optimal, spec, sched, x, jax.random.key(0)))(x0)
  bad = losses.nll_bpd(wrong, spec, sched, x0, jax.random.key(0))
  assert nll.vb.shape == (2, 100) and nll.mse.shape == (2, 100)
  assert np.all(np.isfinite(nll.total_bpd))
  np.testing.assert_allclose(nll.total_bpd, nll.prior_bpd + nll.vb.sum(1), rtol=1e-6)
  # The optimal model's posterior is exact: every KL term is 0 ...
  np.testing.assert_allclose(nll.vb[:, 1:], 0.0, atol=1e-4)
  # ... and L_0 is the mass of the true bin, +-1/255, under N(c, beta~_1) (fixed small).
  sigma = math.sqrt(float(sched.posterior_variance[1]))
  bin_mass = math.erf(1 / 255 / sigma / math.sqrt(2))
  np.testing.assert_allclose(nll.vb[:, 0], -math.log2(bin_mass), rtol=1e-2)
  np.testing.assert_allclose(nll.mse, 0.0, atol=1e-6)
  assert float(bad.total_bpd.min()) > float(nll.total_bpd.max()) + 1.0


def test_nll_clip_x0_bounds_the_clipped_sampler():
  """clip_x0 equals the unclipped bound of an eps model that clips its own x_0 estimate."""
  c = 0.6 - 0.6 % (2 / 255)
  x0 = jnp.full((2, 4, 4, 1), c)
  sched, _, wrong = _point_mass_models(c)  # eps = 0: x_0 estimates x_t / sqrt(abar), far outside
  spec = ModelSpec(clip_x0=False)

  def self_clipping(x_t, t):
    pred_x0 = jnp.clip(diffusion.x0_from_eps(sched, x_t, t, wrong(x_t, t)), -1.0, 1.0)
    return diffusion.eps_from_x0(sched, x_t, t, pred_x0)

  key = jax.random.key(3)
  clipped = losses.nll_bpd(wrong, spec, sched, x0, key, clip_x0=True)
  reference = losses.nll_bpd(self_clipping, spec, sched, x0, key)
  unclipped = losses.nll_bpd(wrong, spec, sched, x0, key)
  np.testing.assert_allclose(clipped.vb, reference.vb, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(clipped.x0_mse, reference.x0_mse, rtol=1e-4, atol=1e-6)
  assert np.all(clipped.x0_mse <= 4.0 + 1e-6)  # (c - [-1, 1])^2 <= 4 once clipped
  assert float(unclipped.x0_mse.max()) > 10.0 and float(clipped.total_bpd.max()) < float(
    unclipped.total_bpd.min()
  )


def test_public_functions_run_under_jit():
  spec = ModelSpec(var_type="learned_range")
  x0 = (
    jnp.round(jax.random.uniform(jax.random.key(0), (2, 4, 4, 3), minval=-1, maxval=1) * 127.5)
    / 127.5
  )
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 500])
  model = lambda x_t, t: jnp.concatenate([0.5 * x_t, jnp.zeros_like(x_t)], -1)
  eager_and_jitted = [
    (losses.normal_kl, (x0, 0.1, noise, -0.2)),
    (losses.discretized_gaussian_log_likelihood, (x0, noise, -2.0)),
    (losses.prior_bits, (SCHED, x0)),
    (lambda s, x, n: losses.vb_term_bits(spec, s, model(x, t), x, n, t), (SCHED, x0, noise)),
    (lambda s, x, n: losses.training_losses(model, spec, s, "hybrid", x, t, n), (SCHED, x0, noise)),
  ]
  for fn, args in eager_and_jitted:
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      fn(*args),
      jax.jit(fn)(*args),
    )


def test_discretized_decoder_matches_the_cdf_difference_and_keeps_tail_precision():
  grid = np.arange(256) / 127.5 - 1.0
  mean, scale = 0.1, np.exp(-2.5)
  log_p = np.asarray(
    losses.discretized_gaussian_log_likelihood(jnp.asarray(grid, jnp.float32), mean, -2.5),
    np.float64,
  )
  # Reference: the bin mass as a difference of float64 CDFs, taken on the side of the
  # mean where both CDFs are small, so that it does not cancel.
  logit = lambda z: 2 * np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)
  cdf = lambda z: 1 / (1 + np.exp(-logit(z)))  # = 0.5 (1 + tanh(...))
  hi = np.where(grid > 0.999, np.inf, (grid - mean + 1 / 255) / scale)
  lo = np.where(grid < -0.999, -np.inf, (grid - mean - 1 / 255) / scale)
  with np.errstate(over="ignore"):
    mass = np.where(grid <= mean, cdf(hi) - cdf(lo), cdf(-lo) - cdf(-hi))
  np.testing.assert_allclose(log_p, np.log(mass), rtol=1e-4)
  assert log_p.min() < -30  # tails far below the reference code's clamp at log(1e-12)
