"""The probability-flow ODE likelihood: closed forms, score_sde's procedure, sharding, the solver.

Models here are analytic: Gaussian data N(mu, s^2 I), whose every marginal
p_t = N(alpha mu, (alpha^2 s^2 + sigma^2) I) and score are known, and a
two-component Gaussian mixture, whose score has a full (non-diagonal)
Jacobian. tests/data/ode_likelihood/references.npz holds score_sde's
procedure on the mixture (its make_references.py: SciPy RK45 in float64).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import diffusion, edm, ode, schedules
from diffusion_jax import ode_likelihood as odl

SDE = odl.VPSDE()
REFERENCES = os.path.join(os.path.dirname(__file__), "data", "ode_likelihood", "references.npz")
EXACT = odl.DivergenceConfig(divergence="exact")


def gaussian_log_density(x, mean, var):
  """log N(x; mean, var I) [B] of x [B, ...]."""
  dims = math.prod(x.shape[1:])
  sq = jnp.sum(jnp.square(x - mean).reshape(x.shape[0], -1), -1)
  return -0.5 * dims * jnp.log(2 * jnp.pi * var) - 0.5 * sq / var


def gaussian_score(mu, s):
  return gaussian_score_of(SDE, mu, s)


def mixture_score(means, scales, weights):
  """The score of p_t for data sum_k w_k N(m_k, s_k^2 I) over flat [B, D] points."""
  means, scales, weights = (jnp.asarray(a, jnp.float32) for a in (means, scales, weights))

  def score(x, t):
    alpha, sigma = SDE.alpha_sigma(t)  # [B]
    var = jnp.square(alpha[:, None] * scales) + jnp.square(sigma)[:, None]  # [B, K]
    diff = x[:, None, :] - alpha[:, None, None] * means  # [B, K, D]
    log_n = (
      -0.5 * x.shape[-1] * jnp.log(2 * jnp.pi * var) - 0.5 * jnp.sum(jnp.square(diff), -1) / var
    )
    r = jax.nn.softmax(jnp.log(weights) + log_n, axis=-1)
    return jnp.einsum("bk,bkd->bd", r, -diff / var[..., None])

  return score


@pytest.fixture(scope="module")
def refs():
  return dict(np.load(REFERENCES))


@pytest.fixture(scope="module")
def mixture(refs):
  return mixture_score(refs["means"], refs["scales"], refs["weights"])


# ----------------------------------------------------------------------------- closed form


def gaussian_score_of(sde, mu, s):
  def score(x, t):
    alpha, sigma = sde.alpha_sigma(t)
    alpha, var = (
      odl.per_example(alpha, x.ndim),
      odl.per_example(jnp.square(alpha * s) + jnp.square(sigma), x.ndim),
    )
    return -(x - alpha * mu) / var

  return score


@pytest.fixture(scope="module", params=["linear", "cosine"])
def gaussian_case(request):
  """Gaussian data in D = 8 (shaped [B, 2, 2, 2]), 6 test points, the exact divergence."""
  sde = SDE if request.param == "linear" else odl.CosineVPSDE()
  mu, s = jnp.linspace(-0.6, 0.6, 8).reshape(2, 2, 2), 0.4
  x = mu + s * jax.random.normal(jax.random.key(1), (6, 2, 2, 2))
  alpha1, sigma1 = sde.alpha_sigma(jnp.float32(sde.t_max))
  prior = lambda z: gaussian_log_density(z, alpha1 * mu, alpha1**2 * s**2 + sigma1**2)
  result = jax.jit(
    lambda x: odl.log_likelihood(
      gaussian_score_of(sde, mu, s), sde, x, jax.random.key(0), divergence=EXACT, prior_log_p=prior
    )
  )(x)
  return sde, mu, s, x, result


def test_gaussian_data_density_in_nats_and_bits_per_dim(gaussian_case):
  """Exact score, exact divergence, the exact prior p_1: the ODE gives back log N(x; mu, s^2 I)."""
  sde, mu, s, x, result = gaussian_case
  assert bool(result.solution.finished)
  alpha, sigma = sde.alpha_sigma(jnp.float32(sde.t_min))
  p_eps = gaussian_log_density(x, alpha * mu, alpha**2 * s**2 + sigma**2)  # the ODE's own t
  np.testing.assert_allclose(result.log_p, p_eps, rtol=1e-4)
  p_data = gaussian_log_density(x, mu, s**2)
  np.testing.assert_allclose(result.log_p, p_data, rtol=1e-3)
  np.testing.assert_allclose(
    odl.bits_per_dim(result.log_p, 8, 0.0), -p_data / (8 * math.log(2)), rtol=1e-3
  )


def test_gaussian_with_the_standard_normal_prior_is_close(gaussian_case):
  """score_sde's N(0, I) prior instead of p_1: off by log N(z; 0, I) - log p_1(z), nothing else."""
  sde, mu, s, x, exact_prior = gaussian_case
  result = odl.log_likelihood(
    gaussian_score_of(sde, mu, s), sde, x, jax.random.key(0), divergence=EXACT
  )
  np.testing.assert_allclose(result.delta_log_p, exact_prior.delta_log_p, rtol=1e-5)
  np.testing.assert_allclose(result.prior_log_p, odl.standard_normal_log_p(result.z), rtol=1e-6)


# ----------------------------------------------------------------------------- Hutchinson


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(mixture, refs, probe):
  """256 copies of one mixture point, each its own probe: the mean is the exact value within 3 SE"""
  x = jnp.broadcast_to(jnp.asarray(refs["x"][:1], jnp.float32), (256, 6))
  keys = jax.random.split(jax.random.key(7), 256)
  solve = jax.jit(
    lambda x, keys, config: odl.log_likelihood(mixture, SDE, x, keys, divergence=config),
    static_argnums=2,
  )
  exact = solve(x[:1], keys[:1], EXACT).log_p[0]
  estimates = np.asarray(solve(x, keys, odl.DivergenceConfig(probe=probe)).log_p)
  standard_error = estimates.std(ddof=1) / math.sqrt(len(estimates))
  assert standard_error > 1e-3  # a real estimator (the mixture's Jacobian is not diagonal)
  assert abs(estimates.mean() - float(exact)) < 3 * standard_error, (estimates.mean(), exact)
  # More probes per example: the same mean, a smaller spread.
  four = np.asarray(solve(x, keys, odl.DivergenceConfig(probe=probe, probes=4)).log_p)
  assert four.std() < 0.7 * estimates.std()
  assert abs(four.mean() - float(exact)) < 3 * four.std(ddof=1) / math.sqrt(len(four))


# ----------------------------------------------------------------------------- score_sde


@pytest.mark.parametrize("case", ["rademacher", "gaussian", "exact"])
def test_equals_score_sdes_procedure(mixture, refs, case):
  """The same model, points and probes as score_sde's likelihood_fn (SciPy RK45, float64)."""
  x = jnp.asarray(refs["x"], jnp.float32)
  probes = None if case == "exact" else jnp.asarray(refs[case], jnp.float32)[None]
  divergence = EXACT if case == "exact" else odl.DivergenceConfig(probe=case)
  result = jax.jit(
    lambda x: odl.log_likelihood(
      mixture, SDE, x, jax.random.key(0), divergence=divergence, probes=probes
    )
  )(x)
  # float32 against float64, both within rtol = atol = 1e-5 of the solution.
  np.testing.assert_allclose(result.delta_log_p, refs[f"{case}_delta"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(result.z, refs[f"{case}_z"], atol=1e-4)
  np.testing.assert_allclose(odl.bits_per_dim(result.log_p, 6, 7.0), refs[f"{case}_bpd"], atol=1e-4)
  assert int(result.solution.nfe) == int(refs[f"{case}_nfe"])  # the same steps as SciPy's


# ----------------------------------------------------------------------------- sharding


def _sharded_solve(score, x, keys, weights, devices):
  mesh = Mesh(np.asarray(devices), ("data",))
  batch = NamedSharding(mesh, P("data"))
  fn = jax.jit(
    lambda x, keys, w: odl.log_likelihood(score, SDE, x, keys, weights=w),
    in_shardings=(batch, batch, batch),
  )
  return fn(*jax.device_put((x, keys, weights), batch))


def test_eight_devices_equal_one(mixture, refs):
  """The batch split over 8 devices: the same values and the same steps as on one device."""
  assert jax.device_count() == 8, "conftest.py fakes 8 CPU devices"
  x = jnp.asarray(np.concatenate([refs["x"]] * 4), jnp.float32)  # 16 points
  keys = jax.random.split(jax.random.key(3), 16)
  weights = jnp.ones(16)
  one = _sharded_solve(mixture, x, keys, weights, jax.devices()[:1])
  eight = _sharded_solve(mixture, x, keys, weights, jax.devices())
  assert len(eight.log_p.sharding.device_set) == 8
  np.testing.assert_allclose(eight.log_p, one.log_p, rtol=1e-5)
  for name in ("nfe", "accepted", "rejected"):
    assert int(getattr(eight.solution, name)) == int(getattr(one.solution, name)), name


def test_the_batch_takes_its_hardest_examples_steps_on_every_device(mixture, refs):
  """Invariant: one step count per batch, set by the error norm over all of it (padding left out).

  An easy batch (points near a mode, whose flow is gentle) needs fewer steps
  than the same batch with one hard point on the last of 8 devices; then
  every device takes the hard batch's steps, as one device does; and rows of
  weight 0 (padding, however wild) change nothing.
  """
  easy = jnp.asarray(np.repeat(refs["means"][:1], 8, 0), jnp.float32)
  hard = easy.at[7].set(jnp.asarray(refs["x"][1]) * 3.0)
  keys = jax.random.split(jax.random.key(5), 8)
  ones = jnp.ones(8)
  easy_nfe = int(_sharded_solve(mixture, easy, keys, ones, jax.devices()).solution.nfe)
  sharded = _sharded_solve(mixture, hard, keys, ones, jax.devices())
  single = _sharded_solve(mixture, hard, keys, ones, jax.devices()[:1])
  assert int(sharded.solution.nfe) == int(single.solution.nfe) > easy_nfe
  # The hard point as padding (weight 0): the easy batch's steps, and the values of the easy
  # batch with the same row as padding (not of the easy batch: its 8th row counts there).
  padded = _sharded_solve(mixture, hard, keys, ones.at[7].set(0.0), jax.devices())
  assert int(padded.solution.nfe) == easy_nfe
  easy_padded = _sharded_solve(mixture, easy, keys, ones.at[7].set(0.0), jax.devices())
  np.testing.assert_array_equal(padded.log_p[:7], easy_padded.log_p[:7])
  assert int(easy_padded.solution.nfe) == easy_nfe


# ----------------------------------------------------------------------------- solver, data


@pytest.mark.parametrize("config", [ode.SolverConfig(), ode.SolverConfig(method="fixed", steps=30)])
def test_solver_on_a_known_solution(config):
  """dy/dt = cos(t) y on [0.5, 3]: y = y0 exp(sin t - sin 0.5), a pytree of two leaves."""
  fn = lambda t, y: jax.tree.map(lambda leaf: jnp.cos(t) * leaf, y)
  y0 = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  solution = jax.jit(lambda y: ode.solve(fn, y, 0.5, 3.0, config))(y0)
  factor = math.exp(math.sin(3.0) - math.sin(0.5))
  np.testing.assert_allclose(solution.y["a"], factor * np.array([1.0, -2.0]), rtol=2e-5)
  np.testing.assert_allclose(solution.y["b"], factor * 0.5, rtol=2e-5)
  assert float(solution.t) == 3.0 and bool(solution.finished)
  steps = int(solution.accepted) + int(solution.rejected)
  assert int(solution.nfe) == 6 * steps + (1 if config.method == "fixed" else 2)


def test_fixed_steps_approach_the_adaptive_solution(mixture, refs):
  x = jnp.asarray(refs["x"], jnp.float32)
  fixed = odl.log_likelihood(
    mixture,
    SDE,
    x,
    jax.random.key(0),
    divergence=EXACT,
    solver=ode.SolverConfig(method="fixed", steps=200),
  )
  assert int(fixed.solution.nfe) == 6 * 200 + 1
  np.testing.assert_allclose(fixed.delta_log_p, refs["exact_delta"], rtol=1e-3, atol=1e-3)


def test_dequantisation_bins_and_offsets():
  k = jnp.arange(256, dtype=jnp.float32)
  grid = jnp.tile(k / 127.5 - 1.0, (4, 1))  # [4, 256]: every pixel value, 4 draws
  keys = jax.random.split(jax.random.key(0), 4)
  x, offset = odl.dequantize(grid, keys, "uniform")
  assert offset == 7.0
  assert bool(jnp.all((x >= k / 128 - 1) & (x < (k + 1) / 128 - 1)))  # score_sde's bins of 2/256
  x, offset = odl.dequantize(grid, keys, "centered")
  assert offset == pytest.approx(math.log2(127.5))
  assert bool(jnp.all(jnp.abs(x - grid) <= 0.5 / 127.5 + 1e-6))  # bins centred on the grid
  assert len(np.unique(np.asarray(x[:, 3]))) == 4  # each example its own noise
  x, offset = odl.dequantize(grid, keys, "none")
  assert x is grid and offset == pytest.approx(math.log2(127.5))
  with pytest.raises(ValueError, match="dequantisation 'variational'"):
    odl.dequantize(grid, keys, "variational")


# ----------------------------------------------------------------------------- models


def test_linear_schedules_map_to_score_sdes_vp_sde():
  for num_timesteps in (1000, 4000, 50):
    sde = odl.vp_sde_of(schedules.get_schedule("linear", num_timesteps))
    assert (sde.beta_min, sde.beta_max) == pytest.approx((0.1, 20.0), rel=1e-5)
  with pytest.raises(ValueError, match="neither"):
    odl.vp_sde_of(schedules.get_schedule("quadratic", 1000))


@pytest.mark.parametrize("num_timesteps", [1000, 100])
def test_the_cosine_sde_has_the_cosine_schedules_noise_levels(num_timesteps):
  """abar((i + 1) / T) of the SDE is the discrete abar_i, and the network is called at i there."""
  schedule = schedules.get_schedule("cosine", num_timesteps)
  sde = odl.vp_sde_of(schedule)
  assert isinstance(sde, odl.CosineVPSDE) and sde.t_max == 1 - 1 / num_timesteps
  i = np.arange(num_timesteps - 1)
  t = jnp.asarray((i + 1) / num_timesteps, jnp.float32)
  alpha, sigma = sde.alpha_sigma(t)
  discrete = -np.expm1(np.cumsum(np.log1p(-schedules.cosine_betas(num_timesteps))))  # float64
  np.testing.assert_allclose(jnp.square(sigma), discrete[i], rtol=2e-4)
  np.testing.assert_allclose(sde.timestep(t), i, atol=2e-3 * num_timesteps / 1000 + 1e-3)
  # beta(t) = -d log abar / dt, by central differences in float64's stead: 1e-3 relative.
  h = 1e-3
  t_mid = jnp.array([0.1, 0.5, 0.9])
  derivative = -(2 * sde.log_alpha(t_mid + h) - 2 * sde.log_alpha(t_mid - h)) / (2 * h)
  np.testing.assert_allclose(sde.beta(t_mid), derivative, rtol=1e-3)


def test_every_parameterisation_gives_the_same_score():
  """eps, x0, v and EDM networks that are exact for Gaussian data: the exact score from each."""
  num_timesteps = 1000
  mu, s = 0.3, 0.5
  truth = gaussian_score(mu, s)
  x = jax.random.normal(jax.random.key(2), (5, 2, 2, 1))
  # Not t_min = 1e-5: there x0's score, (alpha x0 - x) / sigma^2 with sigma^2 = 1e-6, turns
  # float32 rounding of x (6e-8) into 0.06 (the x0 parameterisation's own amplification).
  t = jnp.array([1e-3, 0.01, 0.3, 0.7, 1.0])

  def from_label(label):  # the network is called at t (T - 1)
    t = label / (num_timesteps - 1)
    alpha, sigma = (odl.per_example(a, 4) for a in SDE.alpha_sigma(t))
    return t, alpha, sigma

  def eps_net(x, label):
    t, alpha, sigma = from_label(label)
    return -sigma * truth(x, t)

  def x0_net(x, label):
    t, alpha, sigma = from_label(label)
    return (x + sigma**2 * truth(x, t)) / alpha

  def v_net(x, label):
    t, alpha, sigma = from_label(label)
    return alpha * eps_net(x, label) - sigma * x0_net(x, label)

  def learned_var_eps_net(x, label):
    return jnp.concatenate([eps_net(x, label), jnp.full_like(x, 9.0)], axis=-1)

  precond = edm.Preconditioning()

  def edm_net(x_in, c_noise):  # F with D(y; sd) = E[y_0 | y] for y = y_0 + sd n
    sd = odl.per_example(jnp.exp(4.0 * c_noise), 4)  # c_noise = ln(sigma) / 4 (EDM Table 1)
    c = precond.coefficients(sd.reshape(-1))
    y = x_in / odl.per_example(c.c_in, 4)
    denoised = mu + s**2 / (s**2 + sd**2) * (y - mu)
    return (denoised - odl.per_example(c.c_skip, 4) * y) / odl.per_example(c.c_out, 4)

  cases = {
    "epsilon": (eps_net, diffusion.ModelSpec("epsilon")),
    "x0": (x0_net, diffusion.ModelSpec("x0")),
    "v": (v_net, diffusion.ModelSpec("v")),
    "learned_range": (learned_var_eps_net, diffusion.ModelSpec("epsilon", "learned_range")),
    "edm": (edm_net, diffusion.ModelSpec(edm=precond)),
  }
  for name, (net, spec) in cases.items():
    score = odl.score_from_model(net, spec, SDE)(x, t)
    np.testing.assert_allclose(score, truth(x, t), rtol=2e-3, atol=1e-3, err_msg=name)


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="Unknown divergence 'trace'"):
    odl.DivergenceConfig(divergence="trace")
  with pytest.raises(ValueError, match="Unknown probe 'sphere'"):
    odl.DivergenceConfig(probe="sphere")
  with pytest.raises(ValueError, match="probes"):
    odl.DivergenceConfig(probes=0)
  with pytest.raises(ValueError, match="Unknown ODE solver 'euler'"):
    ode.SolverConfig(method="euler")
  assert dataclasses.replace(ode.SolverConfig(), rtol=1e-3).rtol == 1e-3


# ----------------------------------------------------------------------------- evaluation


def test_nll_ode_metric_of_a_smoke_run_resumes(digits_smoke_run):
  """`nll_ode` in an evaluation: its report, its saved batches, and a resumed rerun.

  (Its 2-process run through launch.evaluate is tests/test_evaluate_hosts.py's.)
  """
  from configs.eval import digits as digits_eval  # pylint: disable=g-import-not-at-top
  from diffusion_jax import evaluation  # pylint: disable=g-import-not-at-top

  config = digits_eval.get_config("smoke")
  config.update(name="ode", metrics=("nll_ode",), real_floor=False, num_samples=2, batch_size=8)
  config.samplers = (dict(sampler="ddim", steps=1),)
  config.nll_ode.update(num_examples=5, batch_size=8, rtol=1e-3, atol=1e-3, repeats=2)
  config = evaluation.from_config_dict(config)
  report = evaluation.evaluate(config, digits_smoke_run)
  ode_report = report["nll_ode"]
  assert ode_report["num_examples"] == 5 and ode_report["repeats"] == 2
  assert np.isfinite(ode_report["bpd"]) and 0 < ode_report["bpd"] < 30
  assert ode_report["bpd"] == pytest.approx(np.mean(ode_report["bpd_per_repeat"]))
  assert ode_report["bpd_per_repeat"][0] != ode_report["bpd_per_repeat"][1]  # fresh noise
  # bits/dim = nats / (D ln 2) + 7 (score_sde's uniform dequantisation of 8-bit data).
  assert ode_report["bpd"] == pytest.approx(
    ode_report["nll_nats"] / (64 * math.log(2)) + 7.0, rel=1e-5
  )
  assert ode_report["nfe"] == 6 * (ode_report["accepted"] + ode_report["rejected"]) + 2
  assert "nll_ode" in report["seconds"]
  out_dir = os.path.join(digits_smoke_run, "eval", "ode-step4")
  (folder,) = [d for d in os.listdir(out_dir) if d.startswith("nll_ode-")]
  saved = os.path.join(out_dir, folder, "repeat1", "batch_000000.npz")
  mtime = os.stat(saved).st_mtime_ns
  os.remove(os.path.join(out_dir, folder, "repeat0", "batch_000000.npz"))
  rerun = evaluation.evaluate(config, digits_smoke_run)["nll_ode"]
  assert os.stat(saved).st_mtime_ns == mtime  # reused, not recomputed
  assert rerun["bpd_per_repeat"] == pytest.approx(ode_report["bpd_per_repeat"], rel=1e-6)


def test_nll_ode_refuses_a_quadratic_schedule(digits_smoke_run):
  from diffusion_jax import runs  # pylint: disable=g-import-not-at-top
  from diffusion_jax.evaluation import nll_ode  # pylint: disable=g-import-not-at-top

  model = runs.load_ema_for_sampling(digits_smoke_run)
  nll_ode.check_model(model)  # the digits run's cosine schedule
  quadratic = dataclasses.replace(model, schedule=schedules.get_schedule("quadratic", 1000))
  with pytest.raises(ValueError, match="neither"):
    nll_ode.check_model(quadratic)
