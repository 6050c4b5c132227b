"""Samplers against the closed forms of Gaussian data, and their plumbing.

For data x_0 ~ N(MU, S^2 I) everything is known: x_t ~ N(sqrt(abar) MU,
abar S^2 + 1 - abar), the optimal eps-model is affine in x_t, and the
probability-flow ODE maps the standardised x_T to the same standardised x_t.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from diffusion_jax import edm, images, sampling, schedules
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.sampling import generate

T = 1000
MU, S = 0.3, 0.5
SCHEDULE = schedules.get_schedule("linear", T)
SPEC = ModelSpec(clip_x0=False)
# The programs here are tiny: compiling dominates, so XLA's backend optimisations are skipped.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 1})
# Independent of the library: Ho et al.'s linear betas at T = 1000, in float64.
ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


def gaussian_eps_model(x_t, t):
  """E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar) at timesteps t [B]."""
  abar = jnp.asarray(ALPHAS_CUMPROD, jnp.float32)[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
  return jnp.sqrt(1.0 - abar) * (x_t - jnp.sqrt(abar) * MU) / (abar * S**2 + 1.0 - abar)


def normal(seed, shape):
  """Test inputs from NumPy: drawing them with jax.random would compile a program each."""
  return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def posterior_mean_x0(x_t, abar):
  """E[x_0 | x_t] for the Gaussian data, in float64."""
  return MU + np.sqrt(abar) * S**2 / (abar * S**2 + 1.0 - abar) * (x_t - np.sqrt(abar) * MU)


def exact_ode_sample(x_T, steps):
  """The deterministic samplers' limit on `steps`: the exact ODE from the last step to the
  first (the standardised value is conserved), then their shared last step, E[x_0 | x]."""
  abar = ALPHAS_CUMPROD[np.asarray(steps.timesteps)]
  standardised = lambda a: (np.sqrt(a) * MU, np.sqrt(a * S**2 + 1.0 - a))
  (mean_T, std_T), (mean_0, std_0) = standardised(abar[-1]), standardised(abar[0])
  x = mean_0 + std_0 * (np.asarray(x_T, np.float64) - mean_T) / std_T
  return posterior_mean_x0(x, abar[0])


@functools.cache
def compiled(sampler, spec, model_fn, shape, options):
  """One jitted program per configuration, shared by the tests (compiling dominates here)."""
  return jit(
    lambda steps, key, x_T: sampler(model_fn, spec, steps, key, shape, x_T=x_T, **dict(options))
  )


def sample(
  sampler, steps, shape, seed=0, spec=SPEC, model_fn=gaussian_eps_model, x_T=None, **options
):
  run = compiled(sampler, spec, model_fn, tuple(shape), tuple(sorted(options.items())))
  return np.asarray(
    run(
      sampling.respaced(steps) if isinstance(steps, schedules.Schedule) else steps,
      jax.random.key(seed),
      x_T,
    ),
    np.float64,
  )


# ----------------------------------------------------------------------------- distributions

LARGE, SMALL = (4096, 2, 2, 1), (8, 2, 2, 1)
MOMENT_CASES = {
  # name: (sampler, steps, var_type, options). Discretisation biases of these
  # step counts (<= 3% of the variance, measured on 65k samples) stay well
  # inside the 5 standard errors allowed for 16k samples (5.5%).
  "ddpm_fixed_small": (sampling.ddpm_sample, SCHEDULE, "fixed_small", {}),
  "ddpm_fixed_large": (sampling.ddpm_sample, SCHEDULE, "fixed_large", {}),
  "ddpm_respaced_250": (sampling.ddpm_sample, sampling.respaced(SCHEDULE, 250), "fixed_large", {}),
  "ddim_eta0_250": (
    sampling.ddim_sample,
    sampling.respaced(SCHEDULE, 250),
    "fixed_small",
    {"eta": 0.0},
  ),
  "ddim_eta1": (sampling.ddim_sample, SCHEDULE, "fixed_small", {"eta": 1.0}),
  "dpm_solver_20": (
    sampling.dpm_solver_sample,
    sampling.logsnr_respaced(SCHEDULE, 20),
    "fixed_small",
    {},
  ),
  "dpm_solver_3m_20": (
    sampling.dpm_solver_sample,
    sampling.logsnr_respaced(SCHEDULE, 20),
    "fixed_small",
    {"order": 3},
  ),
  # EDM's Heun through the discrete adapter: its bias at 18 steps is ~11% of the variance
  # on this narrow Gaussian (as EDM's own sampler: tests/test_edm.py), ~1% at 60.
  "edm_heun_60": (sampling.edm_heun_sample, SCHEDULE, "fixed_small", {"num_steps": 60}),
}


@pytest.mark.parametrize("case", sorted(MOMENT_CASES))
def test_samplers_match_gaussian_moments(case):
  sampler, steps, var_type, options = MOMENT_CASES[case]
  x = sample(sampler, steps, LARGE, spec=ModelSpec(var_type=var_type, clip_x0=False), **options)
  n = x.size
  assert abs(x.mean() - MU) < 5 * S / np.sqrt(n)
  assert abs(x.var() - S**2) < 5 * S**2 * np.sqrt(2.0 / n)


def with_variance_output(value):
  """The Gaussian eps-model with a variance channel: `value`, or log beta~_t if None."""

  def model_fn(x, t):
    log_small = SCHEDULE.posterior_log_variance_clipped[t].reshape(-1, 1, 1, 1)
    v = jnp.broadcast_to(log_small if value is None else value, x.shape)
    return jnp.concatenate([gaussian_eps_model(x, t), v], axis=-1)

  return model_fn


@pytest.mark.parametrize(
  "var_type, value, same_as",
  [
    ("learned_range", -1.0, "fixed_small"),
    ("learned_range", 1.0, "fixed_large"),
    ("learned", None, "fixed_small"),
  ],
)
def test_learned_variances_at_their_ends_equal_fixed_ones(var_type, value, same_as):
  """Improved DDPM eq. 15 at v = -1 / +1 is beta~ / beta (the last step adds no noise)."""
  learned = sample(
    sampling.ddpm_sample,
    SCHEDULE,
    SMALL,
    model_fn=with_variance_output(value),
    spec=ModelSpec(var_type=var_type, clip_x0=False),
  )
  fixed = sample(
    sampling.ddpm_sample, SCHEDULE, SMALL, spec=ModelSpec(var_type=same_as, clip_x0=False)
  )
  np.testing.assert_allclose(learned, fixed, atol=1e-5)


def constant_x0_model(x, t):
  del t
  return jnp.full_like(x, 5.0)


@pytest.mark.parametrize(
  "sampler, clip", [("ddpm", True), ("ddim", True), ("dpm_solver", True), ("ddim", False)]
)
def test_predicted_x0_is_clipped_per_spec(sampler, clip):
  """A model predicting x_0 = 5 everywhere ends on clip(5) = 1, or on 5 unclipped."""
  x = sample(
    sampling.get_sampler(sampler),
    sampling.respaced(SCHEDULE, 10),
    SMALL,
    spec=ModelSpec(mean_type="x0", clip_x0=clip),
    model_fn=constant_x0_model,
  )
  np.testing.assert_allclose(x, 1.0 if clip else 5.0, rtol=1e-5)


# ----------------------------------------------------------------------------- DDIM


def test_ddim_eta1_is_ancestral_sampling():
  """Song et al. eq. 16: eta = 1 gives the DDPM posterior variance; same key, same noise."""
  ddim = sample(sampling.ddim_sample, SCHEDULE, SMALL, eta=1.0)
  np.testing.assert_allclose(ddim, sample(sampling.ddpm_sample, SCHEDULE, SMALL), atol=1e-5)
  assert np.abs(ddim - sample(sampling.ddim_sample, SCHEDULE, SMALL)).max() > 0.1


def test_ddim_eta0_is_deterministic_and_inversion_reconstructs():
  x_T = normal(7, LARGE)
  first, second = (
    sample(sampling.ddim_sample, sampling.respaced(SCHEDULE, 100), LARGE, seed=seed, x_T=x_T)
    for seed in (0, 1)
  )
  np.testing.assert_array_equal(first, second)

  x_0 = MU + S * normal(8, LARGE)
  latent = jit(lambda x: sampling.ddim_invert(gaussian_eps_model, SPEC, SCHEDULE, x))(x_0)
  # The exact ODE keeps x's standardised value (x_0 is taken as the state at t = 0).
  abar_0, abar_T = ALPHAS_CUMPROD[0], ALPHAS_CUMPROD[-1]
  exact = np.sqrt(abar_T) * MU + np.sqrt(abar_T * S**2 + 1 - abar_T) * (
    x_0 - np.sqrt(abar_0) * MU
  ) / np.sqrt(abar_0 * S**2 + 1 - abar_0)
  np.testing.assert_allclose(latent, exact, atol=0.02)
  reconstruction = sample(sampling.ddim_sample, SCHEDULE, LARGE, x_T=latent)
  np.testing.assert_allclose(reconstruction, x_0, atol=0.02)  # first order: ~1 / T


# ----------------------------------------------------------------------------- DPM-Solver++

DPM_STEPS = sampling.logsnr_respaced(SCHEDULE, 20)


def test_dpm_solver_20_steps_beats_100_first_order_steps():
  """Second order: 20 steps are closer to the exact ODE than 100 DDIM (first-order) steps,
  and their samples' variance is closer to S^2 than 100 ancestral steps'."""
  x_T = normal(7, LARGE)
  error = lambda sampler, steps: np.abs(
    sample(sampler, steps, LARGE, x_T=x_T) - exact_ode_sample(x_T, steps)
  ).max()
  dpm_error = error(sampling.dpm_solver_sample, DPM_STEPS)
  assert dpm_error < error(sampling.ddim_sample, sampling.respaced(SCHEDULE, 100))
  assert 5 * dpm_error < error(sampling.ddim_sample, DPM_STEPS)  # first order, same grid

  dpm = sample(sampling.dpm_solver_sample, DPM_STEPS, LARGE)
  ancestral = sample(sampling.ddpm_sample, sampling.respaced(SCHEDULE, 100), LARGE)
  assert abs(dpm.var() - S**2) < abs(ancestral.var() - S**2) / 2


def test_dpm_solver_final_denoise_is_the_x0_prediction_at_the_smallest_timestep():
  x_T = normal(7, LARGE)
  x = sample(sampling.dpm_solver_sample, DPM_STEPS, LARGE, x_T=x_T, denoise_to_zero=False)
  denoised = sample(sampling.dpm_solver_sample, DPM_STEPS, LARGE, x_T=x_T)
  np.testing.assert_allclose(posterior_mean_x0(x, ALPHAS_CUMPROD[0]), denoised, atol=1e-5)


def diffusers_dpm_solver(timesteps, order, final_sigmas_type, x_T):
  """diffusers' DPMSolverMultistepScheduler (dpmsolver++, midpoint, lower_order_final on) on the
  Gaussian eps-model, stepping through `timesteps` (descending) from x_T."""
  torch, diffusers = pytest.importorskip("torch"), pytest.importorskip("diffusers")
  scheduler = diffusers.DPMSolverMultistepScheduler(
    num_train_timesteps=T,
    beta_schedule="linear",
    solver_order=order,
    algorithm_type="dpmsolver++",
    final_sigmas_type=final_sigmas_type,
  )
  scheduler.set_timesteps(timesteps=list(timesteps))
  x = torch.from_numpy(x_T)
  for t in scheduler.timesteps:
    eps = gaussian_eps_model(jnp.asarray(x.numpy()), jnp.full((x.shape[0],), int(t)))
    x = scheduler.step(torch.from_numpy(np.array(eps)), t, x).prev_sample
  return x.numpy()


@pytest.mark.parametrize(
  "order, num_steps, final_sigmas_type",
  [
    (2, 8, "sigma_min"),
    (3, 8, "sigma_min"),
    (3, 20, "sigma_min"),
    (2, 20, "zero"),
    (3, 25, "zero"),
  ],
)
def test_dpm_solver_equals_diffusers_step_for_step(order, num_steps, final_sigmas_type):
  """DPM-Solver++(2M/3M) on our log-SNR grid equals diffusers' scheduler stepping the same grid.

  "sigma_min" ends on the smallest timestep: our K - 1 steps without the
  denoising step, lower_order_final active below 15 steps. "zero" ends on
  sigma = 0: our denoise_to_zero (diffusers lowers its second-to-last step
  there instead, so below 15 steps the two differ by design).
  """
  x_T = normal(3, SMALL)
  to_zero = final_sigmas_type == "zero"
  steps = sampling.logsnr_respaced(SCHEDULE, num_steps + (0 if to_zero else 1))
  grid = np.asarray(steps.timesteps)[::-1]
  theirs = diffusers_dpm_solver(grid if to_zero else grid[:-1], order, final_sigmas_type, x_T)
  ours = sample(
    sampling.dpm_solver_sample, steps, SMALL, x_T=x_T, order=order, denoise_to_zero=to_zero
  )
  np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-5)


def test_solver_orders_warm_up_and_lower_the_final_steps():
  """Index i steps from grid point i + 1 to i; index 0 is the step to lambda = inf."""
  orders = lambda *args: sampling.samplers.solver_orders(*args).tolist()
  assert orders(6, 0, 3, True) == [1, 1, 2, 3, 2, 1]  # 5 solver steps + the denoising step
  assert orders(6, 0, 3, False) == [1, 3, 3, 3, 2, 1]
  assert orders(6, 1, 2, True) == [0, 1, 2, 2, 2, 1]  # no denoising step: index 0 unused
  assert orders(16, 0, 2, True) == orders(16, 0, 2, False)  # 15 solver steps: unchanged
  assert orders(15, 0, 2, True) != orders(15, 0, 2, False)
  with pytest.raises(ValueError, match="order must be 1, 2 or 3, got 4"):
    sampling.dpm_solver_sample(
      gaussian_eps_model, SPEC, DPM_STEPS, jax.random.key(0), SMALL, order=4
    )


def test_logsnr_respaced_is_uniform_in_lambda_and_distinct():
  steps = np.asarray(sampling.logsnr_respaced(SCHEDULE, 10).timesteps)
  assert steps[0] == 0 and steps[-1] == T - 1
  lam = 0.5 * np.log(ALPHAS_CUMPROD / (1.0 - ALPHAS_CUMPROD))[steps]
  np.testing.assert_allclose(np.diff(lam), np.diff(lam).mean(), rtol=0.1)
  for num_steps in (300, T):
    many = np.asarray(sampling.logsnr_respaced(SCHEDULE, num_steps).timesteps)
    assert len(many) == num_steps and np.all(np.diff(many) > 0) and many[-1] == T - 1
  with pytest.raises(ValueError, match="log-SNR"):
    sampling.logsnr_respaced(SCHEDULE, T + 1)


# ----------------------------------------------------------------------------- plumbing


def test_respaced_with_every_step_equals_the_full_schedule():
  every = sampling.respaced(SCHEDULE, T)
  np.testing.assert_array_equal(every.timesteps, np.arange(T))
  for sampler in (sampling.ddpm_sample, sampling.ddim_sample):
    np.testing.assert_allclose(
      sample(sampler, every, SMALL), sample(sampler, SCHEDULE, SMALL), atol=1e-5
    )


def test_sharded_sampling_equals_one_device():
  mesh = jax.make_mesh((8,), ("data",))
  steps, shape, key = sampling.respaced(SCHEDULE, 20), (16, 2, 2, 1), jax.random.key(5)
  for sampler, options in ((sampling.ddpm_sample, {}), (sampling.ddim_sample, {"eta": 0.5})):
    run = lambda key: sampler(gaussian_eps_model, SPEC, steps, key, shape, **options)
    sharded = jit(run, out_shardings=NamedSharding(mesh, P("data")))(key)
    assert [shard.data.shape[0] for shard in sharded.addressable_shards] == [2] * 8
    np.testing.assert_allclose(sharded, jit(run)(key), atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver", "ddim_invert"])
def test_trajectory_records_every_kth_step(sampler):
  steps, x_T = sampling.respaced(SCHEDULE, 10), normal(6, SMALL)
  if sampler == "ddim_invert":
    run = lambda steps, key: sampling.ddim_invert(
      gaussian_eps_model, SPEC, steps, x_T, trajectory_every=4
    )
    recorded = [0, 4, 8]  # 9 steps up
  else:
    run = lambda steps, key: sampling.get_sampler(sampler)(
      gaussian_eps_model, SPEC, steps, key, SMALL, x_T=x_T, trajectory_every=4
    )
    recorded = [9, 5, 1]  # 10 steps down
  final, trajectory = jit(run)(steps, jax.random.key(0))
  assert final.shape == SMALL and trajectory.x_t.shape == trajectory.pred_x0.shape == (3,) + SMALL
  np.testing.assert_array_equal(trajectory.timesteps, np.asarray(steps.timesteps)[recorded])
  np.testing.assert_array_equal(trajectory.x_t[0], x_T)
  abar = ALPHAS_CUMPROD[np.asarray(steps.timesteps)[recorded[0]]]
  np.testing.assert_allclose(trajectory.pred_x0[0], posterior_mean_x0(x_T, abar), atol=1e-4)
  if sampler == "ddpm":
    np.testing.assert_allclose(final, sample(sampling.ddpm_sample, steps, SMALL, x_T=x_T))


# ----------------------------------------------------------------------------- guidance


def toy_conditional_model(calls, learned_variance):
  def model_fn(x, t, y):
    calls.append(x.shape[0])
    mean = 0.5 * x + t[:, None, None, None] / T + 0.1 * y[:, None, None, None]
    if not learned_variance:
      return mean
    return jnp.concatenate([mean, jnp.broadcast_to(0.01 * y[:, None, None, None], x.shape)], -1)

  return model_fn


@pytest.mark.parametrize("learned_variance", [False, True])
def test_classifier_free_guidance_formula_in_one_batched_call(learned_variance):
  calls = []
  model_fn = toy_conditional_model(calls, learned_variance)
  spec = ModelSpec(var_type="learned_range" if learned_variance else "fixed_small")
  x = normal(0, (3, 2, 2, 1))
  t, labels, w, null = jnp.array([5, 500, 999]), jnp.array([0, 1, 2]), 3.0, 10
  guided = jit(sampling.classifier_free_guidance(model_fn, spec, labels, w, null))(x, t)
  assert calls == [6]
  conditional = model_fn(x, t, labels)
  unconditional = model_fn(x, t, jnp.full_like(labels, null))
  mean = (1 + w) * conditional[..., :1] - w * unconditional[..., :1]
  np.testing.assert_allclose(guided[..., :1], mean, rtol=1e-5)
  if learned_variance:
    np.testing.assert_allclose(guided[..., 1:], conditional[..., 1:])

  calls.clear()
  guided_fn = sampling.classifier_free_guidance(model_fn, spec, labels, w, null)
  jit(
    lambda key: sampling.ddim_sample(guided_fn, spec, sampling.respaced(SCHEDULE, 10), key, x.shape)
  )(jax.random.key(1))
  assert calls == [6]  # the scan body is traced once: one model call per step, batch 2B


# ----------------------------------------------------------------------------- files


def test_to_uint8_rounds_and_clips():
  np.testing.assert_array_equal(
    images.to_uint8(jnp.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])), [0, 0, 128, 255, 255, 255]
  )


def test_save_image_grid_places_images_row_by_row(tmp_path):
  colours = np.arange(5, dtype=np.uint8)[:, None, None, None] * 50 + np.array([0, 1, 2], np.uint8)
  tiles = np.broadcast_to(colours, (5, 3, 4, 3))
  images.save_image_grid(tiles, tmp_path / "grid.png", ncols=3)
  grid = np.asarray(Image.open(tmp_path / "grid.png"))
  assert grid.shape == (2 * (3 + 2) + 2, 3 * (4 + 2) + 2, 3)
  for k in range(5):
    top, left = 2 + (k // 3) * 5, 2 + (k % 3) * 6
    np.testing.assert_array_equal(grid[top : top + 3, left : left + 4], tiles[k])
  assert grid[7:10, 14:18].max() == 0  # the sixth cell is empty
  images.save_image_grid(tiles[..., :1], tmp_path / "grey.png")
  assert Image.open(tmp_path / "grey.png").mode == "L"
  with pytest.raises(ValueError, match="uint8"):
    images.save_image_grid(tiles.astype(np.float32), tmp_path / "bad.png")


def test_small_images_are_enlarged_in_grids(tmp_path):
  tiles = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 1), dtype=np.uint8)
  images.save_image_grid(tiles, tmp_path / "big.png", ncols=2, padding=0, min_size=8)
  grid = np.asarray(Image.open(tmp_path / "big.png"))
  assert grid.shape == (9, 24)  # factor ceil(8 / 3) = 3
  np.testing.assert_array_equal(grid[::3, :12:3], tiles[0, ..., 0])
  np.testing.assert_array_equal(grid[2::3, 14::3], tiles[1, ..., 0])  # every copy of a pixel


def gaussian_batch_sampler(batch_size, config=sampling.SamplerConfig("ddim", steps=5)):
  apply_fn = lambda params, x, t, y: params * gaussian_eps_model(x, t)
  sample_batch = sampling.make_batch_sampler(
    config, apply_fn, SPEC, SCHEDULE, (2, 2, 1), batch_size
  )
  return jit(lambda key: sample_batch(1.0, key))


def test_sample_to_files_resumes_to_the_uninterrupted_result(tmp_path):
  sample_batch, key = gaussian_batch_sampler(4), jax.random.key(9)
  full = sampling.sample_to_files(sample_batch, 10, 4, str(tmp_path / "full"), key=key)
  assert full.shape == (10, 2, 2, 1) and full.dtype == np.uint8

  calls = []

  def interrupted(key):
    if len(calls) == 1:
      raise KeyboardInterrupt
    calls.append(key)
    return sample_batch(key)

  out = str(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    sampling.sample_to_files(interrupted, 10, 4, out, key=key)
  assert sorted(f for f in os.listdir(out) if f.startswith("batch")) == ["batch_000000.npz"]
  calls.clear()
  counted = lambda key: calls.append(key) or sample_batch(key)
  resumed = sampling.sample_to_files(counted, 10, 4, out, key=key)
  assert len(calls) == 2  # batches 1 and 2 only
  np.testing.assert_array_equal(resumed, full)
  with np.load(os.path.join(out, "samples.npz")) as data:
    np.testing.assert_array_equal(data["arr_0"], full)
  tile = generate.GRID_MIN_SIZE  # the 2x2 samples are enlarged to 32x32 in the grid
  assert Image.open(os.path.join(out, "grid.png")).size == (4 * (tile + 2) + 2, 3 * (tile + 2) + 2)
  assert json.load(open(os.path.join(out, "settings.json")))["batch_size"] == 4
  with pytest.raises(ValueError, match="settings of another run"):
    sampling.sample_to_files(gaussian_batch_sampler(2), 10, 2, out, key=key)


@pytest.mark.parametrize(
  "steps,spacing,grid",
  [
    (5, "auto", "time"),
    (14, "auto", "time"),
    (15, "auto", "log_snr"),
    (20, "auto", "log_snr"),
    (5, "log_snr", "log_snr"),
    (20, "time", "time"),
  ],
)
def test_dpm_solver_steps_are_spaced_in_time_below_15_and_in_log_snr_from_15(steps, spacing, grid):
  config = sampling.SamplerConfig("dpm_solver", steps=steps, spacing=spacing)
  key = jax.random.key(3)
  drawn = jit(
    sampling.make_batch_sampler(
      config, lambda params, x, t, y: gaussian_eps_model(x, t), SPEC, SCHEDULE, (2, 2, 1), 4
    )
  )(None, key)
  grids = {
    "time": sampling.respaced(SCHEDULE, steps),
    "log_snr": sampling.logsnr_respaced(SCHEDULE, steps),
  }
  on_grid = {
    name: jit(
      lambda key, steps=steps_of_grid: sampling.dpm_solver_sample(
        gaussian_eps_model, SPEC, steps, key, (4, 2, 2, 1)
      )
    )(jax.random.split(key)[1])
    for name, steps_of_grid in grids.items()
  }
  np.testing.assert_array_equal(drawn, on_grid[grid])
  assert not np.allclose(on_grid["time"], on_grid["log_snr"])  # the two grids tell apart
  with pytest.raises(ValueError, match="spacing='time' applies to sampler 'dpm_solver' only"):
    sampling.SamplerConfig("ddim", steps=steps, spacing="time")
  with pytest.raises(ValueError, match="Unknown spacing 'logsnr'"):
    sampling.SamplerConfig("dpm_solver", spacing="logsnr")


def test_batch_sampler_with_labels_and_guidance():
  calls = []
  conditional = toy_conditional_model(calls, learned_variance=False)
  w, null, labels = 2.0, 10, np.array([0, 3, 7, 9])
  config = sampling.SamplerConfig("dpm_solver", steps=6, guidance_scale=w)
  spec = ModelSpec(clip_x0=False)  # values, not clipped ones, are compared
  batch_sampler = functools.partial(
    sampling.make_batch_sampler,
    spec=spec,
    schedule=SCHEDULE,
    image_shape=(2, 2, 1),
    batch_size=4,
    num_classes=10,
  )
  x = jit(batch_sampler(config, lambda params, x, t, y: conditional(x, t, y), labels=labels))(
    {}, jax.random.key(0)
  )
  assert x.shape == (4, 2, 2, 1) and calls == [8]
  # Ho & Salimans eq. 6 on the toy: (1 + w) toy(x, t, y) - w toy(x, t, null) is, written out,
  # 0.5 x + t / T + 0.1 (y + w (y - null)); sampled without guidance, it must give the same x.
  shift = 0.1 * (labels + w * (labels - null))[:, None, None, None]
  closed_form = lambda params, x, t, y: 0.5 * x + t[:, None, None, None] / T + shift
  unguided = sampling.SamplerConfig("dpm_solver", steps=6)
  expected = jit(batch_sampler(unguided, closed_form, labels=labels))({}, jax.random.key(0))
  np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
  conditional_only = jit(
    batch_sampler(unguided, lambda params, x, t, y: conditional(x, t, y), labels=labels)
  )({}, jax.random.key(0))
  assert np.abs(x - conditional_only).min() > 0.1  # guidance moved every value
  calls.clear()
  random_labels = jit(batch_sampler(config, lambda params, x, t, y: conditional(x, t, y)))
  assert random_labels({}, jax.random.key(0)).shape == (4, 2, 2, 1) and calls == [8]
  with pytest.raises(ValueError, match=r"labels must be int \[batch_size=4\]"):
    batch_sampler(config, conditional, labels=labels[:3])
  with pytest.raises(ValueError, match="class-conditional"):
    sampling.make_batch_sampler(config, None, ModelSpec(), SCHEDULE, (2, 2, 1), 4)
  with pytest.raises(ValueError, match="'ddim' only"):
    sampling.SamplerConfig("dpm_solver", eta=1.0)
  with pytest.raises(ValueError, match="Unknown sampler"):
    sampling.SamplerConfig("euler")


def test_sampler_config_counts_network_calls_and_names_misplaced_options():
  assert sampling.SamplerConfig("edm_heun", steps=18).nfe(T) == 35  # 2N - 1: no correction at 0
  assert sampling.SamplerConfig("edm_heun").nfe(T) == 35  # EDM's default N = 18
  assert sampling.SamplerConfig("edm_heun", steps=5, guidance_scale=1.0).nfe(T) == 18
  assert sampling.SamplerConfig("dpm_solver", steps=20, order=3).nfe(T) == 20
  assert sampling.SamplerConfig("ddim").nfe(T) == T
  assert sampling.SamplerConfig("edm_heun", steps=18, s_churn=40).label == (
    "edm_heun-18steps-eta0-w0-s_churn40"
  )
  with pytest.raises(ValueError, match="s_churn=1 apply to sampler 'edm_heun' only, not 'ddim'"):
    sampling.SamplerConfig("ddim", s_churn=1.0)
  with pytest.raises(ValueError, match="order=3 applies to sampler 'dpm_solver' only, not 'ddim'"):
    sampling.SamplerConfig("ddim", order=3)
  with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
    sampling.SamplerConfig("dpm_solver", order=0)
  with pytest.raises(ValueError, match=r"sampler.s_noise must be a finite number > 0, got 0.0"):
    sampling.SamplerConfig("edm_heun", s_noise=0.0)
  with pytest.raises(ValueError, match="sampler.s_tmax must be >= s_tmin=2.0, got 1.0"):
    sampling.SamplerConfig("edm_heun", s_churn=1.0, s_tmin=2.0, s_tmax=1.0)


def test_batch_sampler_runs_edm_heun_on_discrete_and_edm_models():
  """edm_heun through make_batch_sampler: guided discrete models via the VP adapter, and
  EDM-preconditioned networks both natively and as x_0-models of the other samplers."""
  calls = []
  conditional = toy_conditional_model(calls, learned_variance=False)
  w, null, labels = 2.0, 10, np.array([0, 3, 7, 9])
  spec = ModelSpec(clip_x0=False)
  config = sampling.SamplerConfig("edm_heun", steps=4, guidance_scale=w)
  guided = jit(
    sampling.make_batch_sampler(
      config,
      lambda p, x, t, y: conditional(x, t, y),
      spec,
      SCHEDULE,
      (2, 2, 1),
      4,
      num_classes=10,
      labels=labels,
    )
  )({}, jax.random.key(0))
  assert calls == [8, 8]  # the Euler and Heun call sites, each one batched call of 2B
  shift = 0.1 * (labels + w * (labels - null))[:, None, None, None]
  closed_form = lambda x, t: 0.5 * x + t[:, None, None, None] / T + shift
  label_key, key = jax.random.split(jax.random.key(0))
  del label_key
  expected = jit(
    lambda key: sampling.edm_sample(
      sampling.denoisers.from_discrete(closed_form, spec, SCHEDULE), key, (4, 2, 2, 1), num_steps=4
    )
  )(key)
  np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-5)

  edm_spec = ModelSpec(clip_x0=False, edm=edm.Preconditioning())
  net = lambda params, x_in, c_noise, y: (
    params * jnp.tanh(x_in) + 0.0 * c_noise[:, None, None, None]
  )
  for name in ("edm_heun", "ddim"):
    draw = jit(
      sampling.make_batch_sampler(
        sampling.SamplerConfig(name, steps=5), net, edm_spec, SCHEDULE, (2, 2, 1), 4
      )
    )
    x = draw(1.0, jax.random.key(2))
    denoiser = sampling.denoisers.from_edm(lambda x_in, c: net(1.0, x_in, c, None), edm_spec)
    _, key = jax.random.split(jax.random.key(2))
    if name == "edm_heun":
      direct = sampling.edm_sample(denoiser, key, (4, 2, 2, 1), num_steps=5)
    else:
      model_fn, x0_spec = sampling.denoisers.as_discrete_model(denoiser, edm_spec, SCHEDULE)
      direct = sampling.ddim_sample(
        model_fn, x0_spec, sampling.respaced(SCHEDULE, 5), key, (4, 2, 2, 1)
      )
    np.testing.assert_allclose(x, direct, rtol=1e-5, atol=1e-6)
