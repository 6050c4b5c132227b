"""Consistency models: the boundary condition, the discretisation and its curriculum, iCT's level
distribution and metric against closed forms; sampling and CD's ODE step on Gaussian data's exact
functions, and CD's train step on its exact teacher learning the exact consistency function; CD
and iCT trained through the loop, resumed, sampled with `--sampler=consistency`."""

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import consistency, edm, process, runs
from diffusion_jax.config.diffusion import DiffusionConfig
from diffusion_jax.config.distill import ConsistencyConfig
from diffusion_jax.train.state import TrainState
from diffusion_jax.sampling import denoisers
from diffusion_jax.sampling.consistency_sampler import consistency_levels, consistency_sample
from distill_common import (  # tests/distill_common.py
  MU,
  STD,
  exact_denoiser,
  exact_f,
  leaves_equal,
  on_teacher,
)

SIGMA_MIN = consistency.SIGMA_MIN


def test_the_boundary_condition_holds_for_any_network():
  precond = consistency.ConsistencyPreconditioning(sigma_data=0.5)
  c = precond.coefficients(jnp.array([SIGMA_MIN, 1.0, 80.0]))
  np.testing.assert_allclose(c.c_skip[0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(c.c_out[0], 0.0, atol=1e-7)
  np.testing.assert_allclose(
    c.c_skip[1:], 0.25 / ((np.array([1.0, 80.0]) - SIGMA_MIN) ** 2 + 0.25), rtol=1e-5
  )
  np.testing.assert_allclose(
    c.c_out[1:],
    0.5 * (np.array([1.0, 80.0]) - SIGMA_MIN) / np.sqrt(np.array([1.0, 6400.0]) + 0.25),
    rtol=1e-5,
  )
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  f = precond.denoise(lambda x_in, c_noise: 7.0 + x_in, x, jnp.full((2,), SIGMA_MIN))
  np.testing.assert_allclose(f, x, atol=1e-6)


def test_the_discretisation_is_edms_in_increasing_order_padded_with_sigma_max():
  sigmas = consistency.karras_boundaries(18, 20)
  np.testing.assert_allclose(sigmas[:18], edm.karras_sigmas(18)[::-1], rtol=1e-5)
  np.testing.assert_allclose([sigmas[0], sigmas[17], sigmas[19]], [0.002, 80.0, 80.0], rtol=1e-5)


@pytest.mark.parametrize(
  "step, expected",
  [
    (0, 11),
    (49_999, 11),
    (50_000, 21),
    (100_000, 41),
    (150_000, 81),
    (300_000, 641),
    (350_000, 1281),
    (399_999, 1281),
  ],
)
def test_ict_curriculum_doubles_the_levels_every_k_prime_steps(step, expected):
  # iCT eq. 5 at K = 400k, s0 = 10, s1 = 1280: K' = floor(400k / (log2(128) + 1)) = 50k.
  assert int(consistency.ict_num_scales(step, 400_000)) == expected
  assert expected == min(10 * 2 ** (step // 50_000), 1280) + 1


def test_ict_levels_follow_the_lognormal_mass_between_adjacent_sigmas():
  sigmas = consistency.karras_boundaries(11, 16)
  p = np.exp(consistency.lognormal_level_logits(sigmas, 11, -1.1, 2.0))
  cdf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in np.asarray(sigmas[:11])]
  expected = np.diff(cdf)
  np.testing.assert_allclose(p[:10], expected, rtol=1e-4)
  assert np.all(p[10:] == 0)


def test_pseudo_huber_is_its_formula_quadratic_near_zero_and_linear_far():
  x = jnp.zeros((2, 32, 32, 3))
  y = x.at[0, 0, 0, 0].set(1e-3).at[1, 0, 0, 0].set(10.0)
  c = 0.00054 * math.sqrt(32 * 32 * 3)
  d = consistency.pseudo_huber(x, y)
  np.testing.assert_allclose(d, [math.sqrt(1e-6 + c**2) - c, math.sqrt(100 + c**2) - c], rtol=1e-5)
  np.testing.assert_allclose(d[0], 1e-6 / (2 * c), rtol=1e-3)
  np.testing.assert_allclose(d[1], 10.0 - c, rtol=1e-4)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_sampling_the_exact_consistency_function_gives_the_data_distribution(num_steps):
  f = denoisers.Denoiser(exact_f, SIGMA_MIN, 80.0)
  samples = consistency_sample(f, jax.random.key(1), (4096, 4, 4, 1), num_steps=num_steps)
  assert abs(float(samples.mean()) - MU) < 0.01
  assert abs(float(samples.std()) - math.sqrt(STD**2 + SIGMA_MIN**2)) < 0.01
  assert np.asarray(consistency_levels(num_steps))[0] == pytest.approx(80.0)


def test_cds_heun_step_on_the_exact_teacher_keeps_the_exact_function_consistent():
  """Along the teacher's ODE the exact f is constant: f(x_n, sigma_n) = f(x_{n+1}, sigma_{n+1}),
  up to Heun's local error, which falls with the step (third order)."""
  x = MU + 3.0 * jax.random.normal(jax.random.key(0), (8, 2, 2, 1))
  errors = []
  for num_scales in (18, 72):
    sigmas = consistency.karras_boundaries(num_scales, num_scales)
    n = jnp.full((8,), num_scales // 2)
    x_next = MU + (x - MU) * sigmas[n + 1] / 3.0  # a point at sigma_{n+1}
    x_cur = consistency.heun_step(exact_denoiser, x_next, sigmas[n + 1], sigmas[n])
    drift = exact_f(x_cur, sigmas[n]) - exact_f(x_next, sigmas[n + 1])
    errors.append(float(jnp.max(jnp.abs(drift))))
  assert errors[0] < 2e-3 and errors[1] < errors[0] / 16  # measured 1.2e-3, 3.1e-5


def _exact_teacher_net(params, x_in, c_noise, labels=None):
  """EDM's raw network F whose D = c_skip x + c_out F (sigma_data = STD) is the toy's exact
  denoiser: D - c_skip x = MU (1 - c_skip), so F = MU sigma / (STD sqrt(sigma^2 + STD^2))."""
  sigma = edm.per_example(jnp.exp(4.0 * c_noise), x_in.ndim)
  return jnp.broadcast_to(MU * sigma / (STD * jnp.sqrt(sigma**2 + STD**2)), x_in.shape)


def _affine_net(params, x_in, c_noise, labels=None, **unused_train_and_rngs):
  """F = a(c_noise) x_in + b(c_noise), (a, b) a 16-unit tanh MLP of c_noise: f* is in its reach."""
  hidden = jnp.tanh(c_noise[:, None] * params["w1"] + params["b1"])  # [B, 16]
  a, b = (edm.per_example(v, x_in.ndim) for v in (hidden @ params["w2"] + params["b2"]).T)
  return a * x_in + b


def test_cd_trained_on_the_exact_teacher_learns_the_exact_consistency_function():
  """800 CD steps (train_step: N = 18, Heun, theta- at mu = 0.95, l2) on N(MU, STD^2) data with
  the exact teacher: f_theta approaches f* on x within 2 standard deviations at sigma from 0.01 to
  80, and its one-step samples f(80 z, 80) the data's mean and std; the untrained f (F = 0, so
  f = c_skip x) misses all three by far (measured: 1.29 from f*, samples' mean 0, std 0.003;
  trained: 0.054, 0.298, 0.532)."""
  from diffusion_jax.distill import consistency_task  # pylint: disable=g-import-not-at-top

  teacher = runs.EmaModel(
    apply_fn=_exact_teacher_net,
    params=(),
    image_shape=(1, 1, 1),
    num_classes=None,
    step=0,
    spec=process.model_spec(DiffusionConfig(parameterization="edm", sigma_data=STD, clip_x0=False)),
    schedule=None,
  )
  tx = optax.adam(1e-2)
  fns = consistency_task.ConsistencyFns(
    apply=_affine_net,
    precond=consistency.ConsistencyPreconditioning(sigma_data=STD),
    tx=tx,
    lr_schedule=optax.constant_schedule(1e-2),
    ema_decay=0.0,
    distill=ConsistencyConfig(method="cd", metric="l2"),
    total_steps=800,
    teacher=teacher,
    conditional=False,
  )
  params = dict(
    w1=2.0 * jax.random.normal(jax.random.key(0), (16,)),
    b1=jnp.linspace(-2, 2, 16),
    w2=jnp.zeros((16, 2)),
    b2=jnp.zeros(2),
  )
  state = TrainState(
    step=jnp.array(0, jnp.int32),
    params=params,
    ema_params=params,
    opt_state=tx.init(params),
    rng=jax.random.key(1),
    sampler_state=consistency_task.ConsistencyState((), params, lpips_params=()),
  )

  @jax.jit
  def train(state):
    def step(state, key):
      batch = {"image": MU + STD * jax.random.normal(key, (256, 1, 1, 1)), "label": None}
      return consistency_task.train_step(state, batch, fns)[0], None

    return jax.lax.scan(step, state, jax.random.split(jax.random.key(2), 800))[0]

  sigma = jnp.array([0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 80.0])
  x = MU + jnp.sqrt(STD**2 + sigma**2)[:, None] * jnp.linspace(-2.0, 2.0, 9)  # [7, 9]
  x, sigma = x.reshape(-1, 1, 1, 1), jnp.repeat(sigma, 9)
  z = jax.random.normal(jax.random.key(3), (4096, 1, 1, 1))

  def errors(params):
    f = lambda x, sigma: fns.precond.denoise(lambda x_in, c: _affine_net(params, x_in, c), x, sigma)
    samples = f(80.0 * z, jnp.full((4096,), 80.0))
    return (
      float(jnp.max(jnp.abs(f(x, sigma) - exact_f(x, sigma)))),
      abs(float(samples.mean()) - MU),
      abs(float(samples.std()) - STD),
    )

  bounds = (0.1, 0.03, 0.06)
  assert all(error > 2 * bound for error, bound in zip(errors(params), bounds))
  trained = errors(train(state).ema_params)
  assert all(error < bound for error, bound in zip(trained, bounds)), trained


# ----------------------------------------------------------------------------- the task


@pytest.fixture(scope="module")
def edm_teacher(tmp_path_factory) -> str:
  """The workdir of a finished configs/digits.py:edm,smoke run (4 steps): CD's teacher."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax.train import loop  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp("digits_edm"))
  loop.train_and_evaluate(digits.get_config("edm,smoke"), workdir)
  return workdir


def _config(method, teacher="", **train):
  from configs import digits_consistency  # pylint: disable=g-import-not-at-top

  return on_teacher(digits_consistency.get_config(f"{method},smoke"), teacher, **train)


@pytest.fixture(scope="module")
def cd_run(edm_teacher, tmp_path_factory):
  from diffusion_jax.train import loop  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp("cd"))
  return workdir, loop.train_and_evaluate(_config("cd", edm_teacher), workdir)


def _samples(workdir, steps):
  from diffusion_jax import runs, sampling  # pylint: disable=g-import-not-at-top

  model = runs.load_ema_for_sampling(workdir)
  draw = sampling.make_batch_sampler(
    sampling.SamplerConfig("consistency", steps),
    model.apply_fn,
    model.spec,
    model.schedule,
    model.image_shape,
    4,
  )
  return draw(model.params, jax.random.key(0))


def test_cd_keeps_its_teacher_and_target_and_samples_in_one_or_two_steps(cd_run, edm_teacher):
  from diffusion_jax import runs  # pylint: disable=g-import-not-at-top

  workdir, state = cd_run
  assert leaves_equal(
    state.sampler_state.teacher_params, runs.load_ema_for_sampling(edm_teacher).params
  )
  # theta- moved from the teacher towards the student, by 1 - mu = 5% a step.
  assert not leaves_equal(state.sampler_state.target_params, state.params)
  assert not leaves_equal(state.sampler_state.target_params, state.sampler_state.teacher_params)
  for steps in (1, 2):
    images = _samples(workdir, steps)
    assert images.shape == (4, 8, 8, 1) and np.all(np.isfinite(images))


def test_cd_resumed_equals_an_unbroken_run(cd_run, edm_teacher, tmp_path):
  from diffusion_jax.train import loop  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(_config("cd", edm_teacher, num_steps=2), workdir)
  resumed = loop.train_and_evaluate(_config("cd", edm_teacher), workdir)
  assert leaves_equal(resumed.params, cd_run[1].params)
  assert leaves_equal(resumed.sampler_state, cd_run[1].sampler_state)


def test_ict_trains_without_a_teacher_and_samples(tmp_path):
  from diffusion_jax.train import loop  # pylint: disable=g-import-not-at-top

  state = loop.train_and_evaluate(_config("ict"), str(tmp_path))
  assert int(state.step) == 4 and state.sampler_state.teacher_params == ()
  images = _samples(str(tmp_path), 2)
  assert images.shape == (4, 8, 8, 1) and np.all(np.isfinite(images))


def test_the_consistency_sampler_refuses_a_diffusion_model(digits_smoke_run):
  from diffusion_jax import runs, sampling  # pylint: disable=g-import-not-at-top

  model = runs.load_ema_for_sampling(digits_smoke_run)
  with pytest.raises(ValueError, match="needs a consistency model"):
    sampling.make_batch_sampler(
      sampling.SamplerConfig("consistency", 1),
      model.apply_fn,
      model.spec,
      model.schedule,
      model.image_shape,
      4,
    )(model.params, jax.random.key(0))
