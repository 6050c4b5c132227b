"""Forward process, parameterisations and p(x_{t-1}|x_t) against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, schedules
from diffusion_jax.diffusion import ModelSpec

SCHED = schedules.get_schedule("linear", 1000)
T_ = jnp.array([0, 1, 250, 999])


def _images(seed=0, shape=(4, 8, 8, 3)):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def test_q_sample_statistics_match_q_mean_variance():
  x0 = jnp.full((2, 128, 128, 1), 0.5)
  t = jnp.array([100, 700])
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  x_t = diffusion.q_sample(SCHED, x0, t, noise)
  mean, var, logvar = diffusion.q_mean_variance(SCHED, x0, t)
  np.testing.assert_allclose(x_t.mean(axis=(1, 2, 3)), mean[:, 0, 0, 0], atol=0.02)
  # The sample variance's relative standard error is sqrt(2/n); allow 5 of them.
  np.testing.assert_allclose(x_t.var(axis=(1, 2, 3)), var.ravel(), rtol=5 * (2 / 128**2) ** 0.5)
  np.testing.assert_allclose(jnp.exp(logvar), var, rtol=1e-5)


@pytest.mark.parametrize("mean_type", ["epsilon", "x0", "v"])
def test_true_target_recovers_x0(mean_type):
  spec = ModelSpec(mean_type=mean_type)
  x0, noise = _images(0), _images(1)
  x_t = diffusion.q_sample(SCHED, x0, T_, noise)
  target = diffusion.mean_target(spec, SCHED, x0, T_, noise)
  np.testing.assert_allclose(diffusion.predict_x0(spec, SCHED, target, x_t, T_), x0, atol=2e-3)
  np.testing.assert_allclose(
    diffusion.eps_from_x0(SCHED, x_t[1:], T_[1:], x0[1:]), noise[1:], atol=2e-3
  )


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_perfect_model_mean_is_the_true_posterior_mean(var_type):
  spec = ModelSpec(var_type=var_type, clip_x0=False)
  x0, noise = _images(0), _images(1)
  x_t = diffusion.q_sample(SCHED, x0, T_, noise)
  output = jnp.concatenate([noise, jnp.zeros_like(noise)], -1) if spec.learns_variance else noise
  p = diffusion.p_mean_variance(spec, SCHED, output, x_t, T_)
  true_mean, _, _ = diffusion.q_posterior(SCHED, x0, x_t, T_)
  np.testing.assert_allclose(p.mean, true_mean, atol=1e-3)
  assert p.log_variance.shape == x_t.shape
  np.testing.assert_allclose(p.variance, jnp.exp(p.log_variance), rtol=1e-6)


def test_variance_types_closed_forms():
  x = jnp.zeros((4, 2, 2, 1))
  get = lambda var_type, v: diffusion.p_mean_variance(
    ModelSpec(var_type=var_type),
    SCHED,
    jnp.concatenate([x, jnp.full_like(x, v)], -1)
    if ModelSpec(var_type=var_type).learns_variance
    else x,
    x,
    T_,
  ).log_variance[:, 0, 0, 0]
  betas, post = np.asarray(SCHED.betas), np.asarray(SCHED.posterior_variance)
  t = np.asarray(T_)
  np.testing.assert_allclose(
    get("fixed_small", 0), np.log(np.append(post[1], post[1:]))[t], rtol=1e-5
  )
  np.testing.assert_allclose(
    get("fixed_large", 0), np.log(np.append(post[1], betas[1:]))[t], rtol=1e-5
  )
  # Improved DDPM eq. 15: v = -1 -> log beta~_t, v = 1 -> log beta_t, v = 0 -> the midpoint.
  np.testing.assert_allclose(get("learned_range", -1.0), get("fixed_small", 0), rtol=1e-5)
  np.testing.assert_allclose(get("learned_range", 1.0), np.log(betas[t]), rtol=1e-5)
  np.testing.assert_allclose(
    get("learned_range", 0.0), 0.5 * (np.log(betas[t]) + get("fixed_small", 0)), rtol=1e-5
  )
  np.testing.assert_allclose(get("learned", -3.0), -3.0)


def test_clipping_of_predicted_x0():
  spec = ModelSpec(mean_type="x0", clip_x0=True)
  x_t = jnp.zeros((4, 2, 2, 1))
  p = diffusion.p_mean_variance(spec, SCHED, jnp.full_like(x_t, 3.0), x_t, T_)
  np.testing.assert_allclose(p.pred_x0, 1.0)
  p = diffusion.p_mean_variance(spec, SCHED, jnp.full_like(x_t, 3.0), x_t, T_, clip_x0=False)
  np.testing.assert_allclose(p.pred_x0, 3.0)


def test_spec_rejects_unknown_names_and_counts_channels():
  with pytest.raises(ValueError, match="mean_type 'eps'.*'epsilon'"):
    ModelSpec(mean_type="eps")
  with pytest.raises(ValueError, match="var_type"):
    ModelSpec(var_type="big")
  assert ModelSpec(var_type="learned_range").output_channels(3) == 6
  assert ModelSpec().output_channels(3) == 3


def test_functions_run_under_jit():
  spec = ModelSpec(var_type="learned_range")
  x0, noise = _images(0), _images(1)
  f = jax.jit(
    lambda s, x0, n, t: diffusion.p_mean_variance(
      spec, s, jnp.concatenate([n, n], -1), diffusion.q_sample(s, x0, t, n), t
    )
  )
  out = f(SCHED, x0, noise, T_)
  assert all(jnp.all(jnp.isfinite(v)) for v in out)
  jitted = [
    jax.jit(fn)(SCHED, x0, T_, noise)
    for fn in (
      diffusion.v_target,
      diffusion.x0_from_v,
      diffusion.x0_from_eps,
      diffusion.eps_from_x0,
    )
  ]
  assert all(j.shape == x0.shape for j in jitted)
  q = jax.jit(diffusion.q_posterior)(SCHED, x0, noise, T_)
  np.testing.assert_allclose(
    q[0], diffusion.q_posterior(SCHED, x0, noise, T_)[0], rtol=1e-5, atol=1e-6
  )
