"""Schedules against the papers' closed forms, and respacing invariants."""

import math

import numpy as np
import pytest

from diffusion_jax import schedules


def test_linear_is_ho_et_al():
  s = schedules.get_schedule("linear", 1000)
  np.testing.assert_allclose(s.betas[0], 1e-4, rtol=1e-6)
  np.testing.assert_allclose(s.betas[-1], 0.02, rtol=1e-6)
  np.testing.assert_allclose(np.diff(np.asarray(s.betas, np.float64)), 0.0199 / 999, rtol=1e-3)


def _evenly(low: float, high: float, T: int) -> np.ndarray:
  """T values from low to high, both ends included, in equal steps."""
  return low + (high - low) * np.arange(T) / (T - 1)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# The betas each schedule's docstring promises, written out here. linear: improved-diffusion's
# get_named_beta_schedule, Ho et al.'s [1e-4, 0.02] scaled by 1000/T; quadratic: Ho et al.'s
# "quad", sqrt(beta) in equal steps, unscaled; sigmoid: DDIM's (ermongroup/ddim), unscaled.
EXPECTED_BETAS = {
  "linear": lambda T: _evenly(1000 / T * 1e-4, 1000 / T * 0.02, T),
  "quadratic": lambda T: _evenly(math.sqrt(1e-4), math.sqrt(0.02), T) ** 2,
  "sigmoid": lambda T: 1e-4 + (0.02 - 1e-4) * _sigmoid(_evenly(-6.0, 6.0, T)),
}


@pytest.mark.parametrize("T", [1000, 100])
@pytest.mark.parametrize("name", sorted(EXPECTED_BETAS))
def test_betas_are_the_closed_form(name, T):
  betas = np.asarray(schedules.get_schedule(name, T).betas, np.float64)
  np.testing.assert_allclose(betas, EXPECTED_BETAS[name](T), rtol=1e-6)


def test_betas_span_the_papers_range():
  linear = np.asarray(schedules.get_schedule("linear", 4000).betas, np.float64)
  np.testing.assert_allclose(linear[[0, -1]], [2.5e-5, 0.005], rtol=1e-6)  # 1000/T = 1/4
  quadratic = np.asarray(schedules.get_schedule("quadratic", 1000).betas, np.float64)
  np.testing.assert_allclose(quadratic[[0, -1]], [1e-4, 0.02], rtol=1e-6)


def test_cosine_alpha_bar_is_the_papers_formula():
  T, s_off = 1000, 0.008
  f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
  expected = np.array([f(t + 1) / f(0) for t in range(T)])
  sched = schedules.get_schedule("cosine", T)
  # Betas are clipped at 0.999 only at the very end; compare where unclipped.
  unclipped = np.asarray(sched.betas) < 0.999
  assert unclipped[:-1].all()
  np.testing.assert_allclose(
    np.asarray(sched.alphas_cumprod)[unclipped], expected[unclipped], rtol=1e-5, atol=1e-9
  )
  assert float(sched.betas[-1]) == pytest.approx(0.999)


@pytest.mark.parametrize("name", sorted(schedules.BETA_SCHEDULES))
def test_derived_terms_are_consistent(name):
  s = schedules.get_schedule(name, 200)
  betas = np.asarray(s.betas, np.float64)
  abar = np.cumprod(1 - betas)
  np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(s.alphas_cumprod_prev[1:], abar[:-1], rtol=1e-5)
  assert float(s.alphas_cumprod_prev[0]) == 1.0 and float(s.alphas_cumprod_next[-1]) == 0.0
  np.testing.assert_allclose(
    np.square(s.sqrt_alphas_cumprod) + np.square(s.sqrt_one_minus_alphas_cumprod), 1.0, rtol=1e-6
  )
  assert np.all(np.isfinite(s.posterior_log_variance_clipped))
  np.testing.assert_allclose(
    s.posterior_log_variance_clipped[0], np.log(s.posterior_variance[1]), rtol=1e-6
  )
  assert all(getattr(s, f).dtype == np.float32 for f in ("betas", "posterior_mean_coef1"))


def test_posterior_is_gaussian_conditioning_of_forward_process():
  """q(x_{t-1}|x_t,x_0) from the joint Gaussian of (x_{t-1}, x_t) given x_0."""
  s = schedules.get_schedule("linear", 1000)
  betas = np.asarray(s.betas, np.float64)
  abar = np.cumprod(1 - betas)
  t = np.arange(1, 1000)
  var_prev = 1 - abar[t - 1]  # Var(x_{t-1} | x_0)
  cov = np.sqrt(1 - betas[t]) * var_prev  # Cov(x_{t-1}, x_t | x_0)
  var_t = 1 - abar[t]
  # mean = sqrt(abar_{t-1}) x0 + cov/var_t (x_t - sqrt(abar_t) x0), so:
  coef_x0 = np.sqrt(abar[t - 1]) - cov / var_t * np.sqrt(abar[t])
  coef_xt = cov / var_t
  np.testing.assert_allclose(s.posterior_mean_coef1[1:], coef_x0, rtol=1e-4)
  np.testing.assert_allclose(s.posterior_mean_coef2[1:], coef_xt, rtol=1e-5)
  np.testing.assert_allclose(s.posterior_variance[1:], var_prev - cov**2 / var_t, rtol=1e-4)


def test_unknown_schedule_names_the_known_ones():
  with pytest.raises(ValueError, match="'cosine'"):
    schedules.get_schedule("cosin", 10)


def test_space_timesteps_specs():
  assert schedules.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  ends = schedules.space_timesteps(1000, 25)
  assert len(ends) == 25 and ends[0] == 0 and ends[-1] == 999
  sections = schedules.space_timesteps(300, "10,5")
  assert len(sections) == 15
  assert sections[:10] == [round(i * 149 / 9) for i in range(10)]
  assert sections[10:] == [150 + round(i * 149 / 4) for i in range(5)]
  assert schedules.space_timesteps(10, [5, 1, 1]) == [1, 5]
  for bad in ("ddim0", "3,x", "200,1"):
    with pytest.raises(ValueError):
      schedules.space_timesteps(300, bad)


def test_respace_with_every_step_reproduces_the_schedule():
  s = schedules.get_schedule("cosine", 100)
  r, timestep_map = schedules.respace(s, range(100))
  np.testing.assert_array_equal(timestep_map, np.arange(100))
  for field in (
    "betas",
    "alphas_cumprod",
    "posterior_variance",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",
  ):
    np.testing.assert_allclose(
      getattr(r, field), getattr(s, field), rtol=1e-5, atol=1e-8, err_msg=field
    )


def test_respace_keeps_alpha_bar_at_kept_steps():
  s = schedules.get_schedule("linear", 1000)
  r, timestep_map = schedules.respace(s, "ddim10")
  assert r.num_timesteps == 10
  np.testing.assert_allclose(
    r.alphas_cumprod, np.asarray(s.alphas_cumprod)[timestep_map], rtol=1e-5
  )
