"""Distillation: progressive distillation's target against two exact DDIM steps, its grids, and
the task trained from a teacher run, resumed, and sampled with `--sampler=ddim --steps=K`."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from diffusion_jax import schedules
from diffusion_jax.config import distill as distill_config
from diffusion_jax.distill import progressive
from diffusion_jax.sampling.loop import noise_levels
from distill_common import exact_x0, leaves_equal, on_teacher  # tests/distill_common.py


@pytest.mark.parametrize("point, stride", [(8, 1), (8, 2), (6, 3), (2, 1), (4, 2)])
def test_the_target_is_the_x0_whose_one_ddim_step_lands_on_two_exact_teacher_steps(point, stride):
  steps = progressive.grid(schedules.get_schedule("cosine", 1000), 8)
  alpha, sigma = (np.asarray(a, np.float64) for a in noise_levels(steps.schedule))
  z = np.random.default_rng(0).normal(size=(3, 2, 2, 1))

  def x0_fn(x, index):  # the exact teacher, at grid point index + 1
    level = lambda values: values[index + 1][:, None, None, None]
    return exact_x0(level(alpha), level(sigma), x)

  target = progressive.two_step_target(
    x0_fn, steps, jnp.asarray(z, jnp.float32), jnp.full((3,), point), jnp.full((3,), stride)
  )
  # Two DDIM steps (Song et al. eq. 12, eta = 0) in float64, by hand.
  x = z
  for p, q in ((point, point - stride), (point - stride, point - 2 * stride)):
    x0 = exact_x0(alpha[p], sigma[p], x)
    x = alpha[q] * x0 + sigma[q] * (x - alpha[p] * x0) / sigma[p]
  end = point - 2 * stride
  one_step = alpha[end] * target + sigma[end] * (z - alpha[point] * target) / sigma[point]
  np.testing.assert_allclose(one_step, x, atol=2e-5)
  if end == 0:  # onto clean data: the target is the teacher's sample itself
    np.testing.assert_allclose(target, x, atol=2e-5)
  assert not np.allclose(target, exact_x0(alpha[point], sigma[point], z), atol=1e-3)


def test_trailing_grids_halve_by_keeping_every_other_timestep():
  fine = schedules.space_timesteps(1000, "trailing256")
  assert fine[-1] == 999 and fine[0] == 3 and len(set(fine)) == 256
  for count in (128, 64, 8, 2, 1):
    stride = 256 // count
    assert schedules.space_timesteps(1000, f"trailing{count}") == fine[stride - 1 :: stride]
  assert schedules.space_timesteps(1000, "trailing1") == [999]


def test_truncated_snr_weight_is_max_of_snr_and_one():
  alpha = jnp.array([0.99, 0.6, 0.1])
  sigma = jnp.sqrt(1 - alpha**2)
  np.testing.assert_allclose(
    progressive.truncated_snr_weight(alpha, sigma), [0.99**2 / (1 - 0.99**2), 1.0, 1.0], rtol=1e-5
  )


def test_rounds_halve_the_student_steps():
  config = distill_config.ProgressiveConfig(start_steps=16, end_steps=2, steps_per_round=10)
  assert config.num_rounds == 3 and config.num_steps == 30
  assert [config.student_steps(s) for s in (0, 1, 10, 11, 20, 21, 30)] == [8, 8, 8, 4, 4, 2, 2]
  with pytest.raises(ValueError, match="power of 2"):
    distill_config.ProgressiveConfig(start_steps=12, end_steps=1)


# ----------------------------------------------------------------------------- the task


def _progressive_config(teacher_workdir, **train):
  from configs import digits_progressive  # pylint: disable=g-import-not-at-top

  return on_teacher(digits_progressive.get_config("smoke"), teacher_workdir, **train)


@pytest.fixture(scope="module")
def progressive_run(digits_smoke_run, tmp_path_factory):
  """(workdir, final state) of configs/digits_progressive.py:smoke: rounds 4 -> 2 -> 1 steps."""
  from diffusion_jax.train import loop  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp("progressive"))
  return workdir, loop.train_and_evaluate(_progressive_config(digits_smoke_run), workdir)


def test_each_round_samples_as_a_model_of_its_steps(progressive_run):
  from diffusion_jax import runs, sampling  # pylint: disable=g-import-not-at-top

  workdir, state = progressive_run
  for checkpoint_step, steps in ((2, 2), (4, 1)):
    student = runs.load_ema_for_sampling(workdir, checkpoint_step)
    assert student.schedule.num_timesteps == steps and student.spec.mean_type.value == "v"
    draw = sampling.make_batch_sampler(
      sampling.SamplerConfig("ddim", steps),
      student.apply_fn,
      student.spec,
      student.schedule,
      student.image_shape,
      4,
    )
    images = draw(student.params, jax.random.key(0))
    assert images.shape == (4, 8, 8, 1) and np.all(np.isfinite(images))
  # Round 1's teacher is round 0's last student (EMA decay 0: its parameters).
  round0 = runs.load_ema_for_sampling(workdir, 2)
  assert leaves_equal(state.sampler_state.teacher_params, round0.params)
  assert not leaves_equal(state.params, round0.params)


def test_a_run_resumed_at_a_round_boundary_equals_an_unbroken_one(
  progressive_run, digits_smoke_run, tmp_path
):
  from diffusion_jax.train import loop  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(_progressive_config(digits_smoke_run, num_steps=2), workdir)
  resumed = loop.train_and_evaluate(_progressive_config(digits_smoke_run), workdir)
  unbroken = progressive_run[1]
  assert int(resumed.step) == 4
  assert leaves_equal(resumed.params, unbroken.params)
  assert leaves_equal(resumed.sampler_state, unbroken.sampler_state)


def test_the_distillation_loss_falls(digits_smoke_run):
  """The loss of one fixed batch, noise and grid point (step 1's), before and after 30 steps."""
  from diffusion_jax import data, parallel  # pylint: disable=g-import-not-at-top
  from diffusion_jax.train import loop, tasks  # pylint: disable=g-import-not-at-top

  config = _progressive_config(digits_smoke_run, num_steps=60)
  config.distill.steps_per_round = 30
  config.optim.update(lr=2e-3, decay_steps=30)
  exp = tasks.build(config)
  mesh = parallel.make_mesh()
  state, shardings = loop.create_state(exp, mesh, seed=0)
  step = loop.compile_train_step(exp, shardings, mesh)
  batches = exp.make_train_iterator()
  fixed = data.make_global_batch(next(batches), parallel.batch_sharding(mesh))

  def fixed_loss(state):
    probe = jax.tree.map(jnp.copy, state).replace(step=jnp.array(1, jnp.int32))
    return float(step(probe, fixed)[1]["loss"].compute())

  before = fixed_loss(state)
  for _ in range(30):
    state, _ = step(state, data.make_global_batch(next(batches), parallel.batch_sharding(mesh)))
  assert fixed_loss(state) < 0.7 * before


def test_a_student_that_is_not_its_teachers_network_is_refused(digits_smoke_run):
  from diffusion_jax.train import tasks  # pylint: disable=g-import-not-at-top

  config = _progressive_config(digits_smoke_run)
  config.model.ch = 16
  config.diffusion.schedule = "linear"
  with pytest.raises(
    ValueError,
    match=r"model\.ch: 32 -> 16.*diffusion\.schedule: 'cosine' ->"
    r" 'linear'",
  ):
    tasks.build(config)
  with pytest.raises(ValueError, match="distill.teacher_workdir is empty"):
    tasks.build(_progressive_config(""))
