"""EDM (Karras et al. 2022): the denoiser adapters, preconditioning, loss and Algorithm 2.

Parity: tests/data/edm/references.npz holds NVlabs/edm's own outputs (commit
008a4e5, made by tests/data/edm/make_references.py) for the analytic network
and Gaussian-mixture denoiser defined identically here.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import cifar10_edm, digits
from diffusion_jax import diffusion, edm, losses, models, process, runs, sampling, schedules
from diffusion_jax.config.diffusion import DiffusionConfig
from diffusion_jax.config.sampler import edm_network_calls
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.models import zoo
from diffusion_jax.sampling import denoisers, edm_sampler
from diffusion_jax.train import loop

REFERENCES = os.path.join(os.path.dirname(__file__), "data", "edm", "references.npz")
MIXTURE = dict(weights=(0.3, 0.7), means=(-0.6, 0.4), stds=(0.15, 0.25))  # as make_references.py
CHURN = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
COSINE = schedules.get_schedule("cosine", 1000)  # iDDPMPrecond's grid: C_1 = 0.001, C_2 = 0.008
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 1})


@pytest.fixture(scope="module")
def ref():
  with np.load(REFERENCES) as data:
    return {key: data[key] for key in data.files}


def nhwc(x):
  return np.moveaxis(np.asarray(x), -3, -1)


def analytic_net(x_in, c_noise):
  """make_references.py's F(x_in, c_noise) = tanh(x_in) (1 + c_noise / 10) + c_noise / 20."""
  c = jnp.asarray(c_noise, jnp.float32).reshape(-1, 1, 1, 1)
  return jnp.tanh(x_in) * (1 + c / 10) + c / 20


def learned_variance_net(x_t, t):
  """F with 7s as the variance channels, as iDDPMPrecond's network outputs 2C channels."""
  return jnp.concatenate([analytic_net(x_t, t), jnp.full_like(x_t, 7.0)], axis=-1)


def mixture_denoise(x, sigma):
  """The exact E[y | y + sigma n] for pixels drawn independently from MIXTURE."""
  sigma = sigma.reshape(-1, 1, 1, 1)
  logits, means = [], []
  for w, mu, s in zip(*MIXTURE.values()):
    var = s * s + jnp.square(sigma)
    logits.append(jnp.log(w) - 0.5 * jnp.log(var) - jnp.square(x - mu) / (2 * var))
    means.append(mu + s * s / var * (x - mu))
  return jnp.sum(jax.nn.softmax(jnp.stack(logits), axis=0) * jnp.stack(means), axis=0)


MIXTURE_DENOISER = sampling.Denoiser(mixture_denoise, 0.0, float("inf"))
EDM_SPEC = ModelSpec(clip_x0=False, edm=edm.Preconditioning())
IDDPM_SPEC = ModelSpec(var_type="learned_range", clip_x0=False)


# ----------------------------------------------------------------------------- parity with NVlabs/edm


def test_preconditioners_equal_edm_networks(ref):
  x, sigma = jnp.asarray(nhwc(ref["precond_x"])), jnp.asarray(ref["precond_sigma"])
  denoisers_ = {
    "edm": denoisers.from_edm(analytic_net, EDM_SPEC),
    "vp": denoisers.from_vp(analytic_net, ModelSpec(clip_x0=False)),
    "iddpm": denoisers.from_discrete(learned_variance_net, IDDPM_SPEC, COSINE),
  }
  for name, denoiser in denoisers_.items():
    np.testing.assert_allclose(
      denoiser.denoise(x, sigma), nhwc(ref[f"precond_{name}"]), rtol=1e-5, atol=1e-5, err_msg=name
    )


def test_discrete_cosine_sigmas_are_iddpm_precond_grid(ref):
  """iDDPMPrecond's u[j] (j = M - 1 - t) is sqrt(1 / abar_t - 1) of the cosine schedule.

  EDM's recursion u[j-1] = sqrt((u[j]^2 + 1) / max(abar(j-1) / abar(j), C_1) - 1)
  runs in float32 and cancels at small sigma (5e-4 relative at sigma = 0.006);
  ours comes from float64, equal to that recursion in float64 to 1e-6.
  """
  ours, theirs = np.asarray(denoisers.discrete_sigmas(COSINE)), ref["iddpm_u"][:-1][::-1]
  large = theirs > 0.1
  np.testing.assert_allclose(ours[large], theirs[large], rtol=1e-5)
  np.testing.assert_allclose(ours, theirs, rtol=1e-3)
  alpha_bar = lambda j: np.sin(0.5 * np.pi * j / 1000 / 1.008) ** 2
  u = np.zeros(1001)
  for j in range(1000, 0, -1):
    u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), 0.001) - 1)
  np.testing.assert_allclose(ours, u[:-1][::-1], rtol=1e-6)


def test_loss_equals_edm_loss(ref):
  precond = edm.Preconditioning()
  sigma = precond.sigma_from_normal(jnp.asarray(ref["loss_rnd_normal"]).reshape(-1))
  terms = edm.training_losses(
    analytic_net,
    precond,
    jnp.asarray(nhwc(ref["loss_images"])),
    sigma,
    jnp.asarray(nhwc(ref["loss_noise"])),
  )
  # EDMLoss returns the per-pixel loss; ours is its mean over the pixels of each image.
  np.testing.assert_allclose(terms.loss, ref["loss"].mean(axis=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("case", ["mixture", "mixture_churn", "iddpm"])
def test_sampler_equals_edm_sampler(ref, case):
  denoiser = (
    denoisers.from_discrete(learned_variance_net, IDDPM_SPEC, COSINE)
    if case == "iddpm"
    else MIXTURE_DENOISER
  )
  noise = jnp.asarray(nhwc(ref[f"sampler_{case}_noise"]), jnp.float32)
  x_T = jnp.asarray(nhwc(ref[f"sampler_{case}_latents"]), jnp.float32)
  x = jit(
    lambda x_T, noise: sampling.edm_sample(
      denoiser,
      jax.random.key(0),
      x_T.shape,
      num_steps=noise.shape[0],
      x_T=x_T,
      churn_noise=noise,
      **(CHURN if case == "mixture_churn" else {}),
    )
  )(x_T, noise)
  np.testing.assert_allclose(x, nhwc(ref[f"sampler_{case}"]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the sampler


def mixture_cdf(x):
  return sum(w * scipy.stats.norm.cdf((x - mu) / s) for w, mu, s in zip(*MIXTURE.values()))


def sample_mixture(num_steps, **options):
  """Sorted float64 pixels of 32k samples drawn from the exact MIXTURE denoiser."""
  x = jit(
    lambda key: sampling.edm_sample(
      MIXTURE_DENOISER, key, (8192, 2, 2, 1), num_steps=num_steps, **options
    )
  )(jax.random.key(1))
  return np.sort(np.asarray(x, np.float64).ravel())


def ks_distance(x):
  """sup |empirical CDF - MIXTURE's CDF| of sorted samples x."""
  return np.abs(np.arange(1, x.size + 1) / x.size - mixture_cdf(x)).max()


def test_18_steps_reproduce_the_gaussian_mixture():
  """From the exact denoiser, 18 Heun steps (35 calls) give MIXTURE's distribution.

  Measured on these 32k pixels: KS distance 0.022 (the sampling noise alone is
  ~0.005), variance 0.283 for 0.2605: Heun's discretisation bias at 18 steps,
  equal to EDM's own sampler (test_sampler_equals_edm_sampler). At 6 steps
  KS is 0.20. EDM's stochastic ImageNet setting (S_churn 40) is meant for
  many steps; at 64 steps its KS is 0.006.
  """
  weights, means, stds = map(np.asarray, MIXTURE.values())
  mean = np.sum(weights * means)
  variance = np.sum(weights * (stds**2 + means**2)) - mean**2
  x = sample_mixture(18)
  assert ks_distance(x) < 0.03
  assert abs(x.mean() - mean) < 0.01 and abs(x.var() / variance - 1) < 0.1
  assert ks_distance(sample_mixture(64, **CHURN)) < 0.015
  assert ks_distance(sample_mixture(6)) > 0.1  # the check can fail


def test_network_calls_are_2n_minus_1():
  calls = []

  def counted(x, sigma):
    jax.debug.callback(lambda: calls.append(1))
    return mixture_denoise(x, sigma)

  denoiser = sampling.Denoiser(counted, 0.0, float("inf"))
  for num_steps, options in ((18, {}), (5, CHURN), (1, {})):
    calls.clear()
    jax.block_until_ready(
      jit(
        lambda key: sampling.edm_sample(denoiser, key, (2, 1, 1, 1), num_steps=num_steps, **options)
      )(jax.random.key(0))
    )
    jax.effects_barrier()
    assert len(calls) == edm_network_calls(num_steps) == 2 * num_steps - 1


def test_noise_levels_follow_eq5_within_the_models_range():
  sigmas = np.asarray(edm_sampler.noise_levels(MIXTURE_DENOISER, 18), np.float64)
  i = np.arange(18)
  expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-5)
  assert sigmas[-1] == 0
  linear = denoisers.from_discrete(None, ModelSpec(), schedules.get_schedule("linear", 1000))
  grid = np.asarray(denoisers.discrete_sigmas(schedules.get_schedule("linear", 1000)))
  rounded = np.asarray(edm_sampler.noise_levels(linear, 18))[:-1]
  assert rounded[-1] == grid[0] and np.isin(rounded, grid).all()  # clamped to 0.01, on the grid
  assert abs(rounded[0] - 80) / 80 < 0.01  # sigma_max 80 < sigma_T = 157: not clamped


def test_sharded_sampling_equals_one_device():
  mesh = jax.make_mesh((8,), ("data",))
  run = lambda key: sampling.edm_sample(MIXTURE_DENOISER, key, (16, 2, 2, 1), num_steps=6, **CHURN)
  sharded = jit(run, out_shardings=NamedSharding(mesh, P("data")))(jax.random.key(3))
  assert [shard.data.shape[0] for shard in sharded.addressable_shards] == [2] * 8
  np.testing.assert_allclose(sharded, jit(run)(jax.random.key(3)), atol=1e-6)


def test_churn_noise_of_the_wrong_shape_is_named():
  with pytest.raises(
    ValueError,
    match=r"churn_noise has shape \(3, 2, 1, 1, 1\), expected"
    r" \(4, 2, 1, 1, 1\)",
  ):
    sampling.edm_sample(
      MIXTURE_DENOISER,
      jax.random.key(0),
      (2, 1, 1, 1),
      num_steps=4,
      churn_noise=jnp.zeros((3, 2, 1, 1, 1)),
      **CHURN,
    )


# ----------------------------------------------------------------------------- adapters


MU, S = 0.3, 0.5  # Gaussian data: the exact eps / x0 / v models are known


def exact_model(mean_type, schedule, rescale=1.0):
  """The optimal model of N(MU, S^2) data for `schedule` (its network sees t * rescale)."""
  abar = schedule.alphas_cumprod

  def model_fn(x_t, t_net):
    a = abar[jnp.round(t_net / rescale).astype(jnp.int32)].reshape(-1, 1, 1, 1)
    x0 = MU + jnp.sqrt(a) * S**2 / (a * S**2 + 1 - a) * (x_t - jnp.sqrt(a) * MU)
    eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return {"epsilon": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[mean_type]

  return model_fn


def exact_denoise(x, sigma):
  return MU + S**2 / (S**2 + np.square(sigma)) * (x - MU)


@pytest.mark.parametrize("mean_type", ["epsilon", "x0", "v"])
def test_discrete_models_denoise_exactly_on_their_grid(mean_type):
  """D(x; sigma_t) of the optimal eps/x0/v model is E[y | x], at rounded sigma and respaced."""
  schedule = schedules.get_schedule("linear", 1000)
  sigmas = np.asarray(denoisers.discrete_sigmas(schedule))
  x = np.random.default_rng(0).standard_normal((3, 2, 2, 1)).astype(np.float32) * 4
  t = np.array([3, 400, 990])
  denoiser = denoisers.from_discrete(
    exact_model(mean_type, schedule), ModelSpec(mean_type=mean_type, clip_x0=False), schedule
  )
  np.testing.assert_allclose(
    denoiser.denoise(x, jnp.asarray(sigmas[t])),
    exact_denoise(x, sigmas[t][:, None, None, None]),
    rtol=2e-4,
    atol=2e-4,
  )
  between = 0.6 * sigmas[t] + 0.4 * sigmas[t + 1]  # nearer to sigma_t
  np.testing.assert_array_equal(denoiser.round_sigma(jnp.asarray(between)), sigmas[t])
  # A respaced grid (network timesteps t * 1000 / 1000 rescaled as the model_fn says).
  steps = sampling.respaced(schedule, 50)
  respaced = denoisers.from_discrete(
    exact_model(mean_type, schedule), ModelSpec(mean_type=mean_type, clip_x0=False), steps
  )
  kept = np.asarray(steps.timesteps)
  np.testing.assert_array_equal(
    respaced.round_sigma(jnp.asarray(sigmas[t])),
    sigmas[kept[np.abs(sigmas[kept][None] - sigmas[t][:, None]).argmin(1)]],
  )


def test_learned_variance_channels_are_ignored_and_x0_clipped():
  schedule = schedules.get_schedule("cosine", 100)
  eps_model = exact_model("epsilon", schedule)
  with_variance = lambda x, t: jnp.concatenate([eps_model(x, t), jnp.full_like(x, 3.0)], -1)
  sigma = denoisers.discrete_sigmas(schedule)[jnp.array([10, 60])]
  x = jnp.full((2, 2, 2, 1), 5.0)
  plain = denoisers.from_discrete(eps_model, ModelSpec(clip_x0=False), schedule)
  learned = denoisers.from_discrete(
    with_variance, ModelSpec(var_type="learned", clip_x0=False), schedule
  )
  np.testing.assert_array_equal(learned.denoise(x, sigma), plain.denoise(x, sigma))
  clipped = denoisers.from_discrete(eps_model, ModelSpec(), schedule).denoise(x, sigma)
  assert float(plain.denoise(x, sigma).max()) > 1.5 and float(clipped.max()) == 1.0


def test_edm_network_denoises_exactly_and_as_a_discrete_x0_model():
  """F that makes D exact for Gaussian data; as_discrete_model gives E[x_0 | x_t] at every t."""
  precond = edm.Preconditioning(sigma_data=0.5)

  def ideal_net(x_in, c_noise):
    sigma = jnp.exp(4 * c_noise)
    c = precond.coefficients(sigma)
    x = x_in / c.c_in.reshape(-1, 1, 1, 1)
    d = MU + S**2 / (S**2 + jnp.square(sigma.reshape(-1, 1, 1, 1))) * (x - MU)
    return (d - c.c_skip.reshape(-1, 1, 1, 1) * x) / c.c_out.reshape(-1, 1, 1, 1)

  spec = ModelSpec(clip_x0=False, edm=precond)
  denoiser = denoisers.from_edm(ideal_net, spec)
  x, sigma = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 2, 2, 1), np.array([0.05, 7.0])
  np.testing.assert_allclose(
    denoiser.denoise(x, jnp.asarray(sigma, jnp.float32)),
    exact_denoise(x, sigma[:, None, None, None]),
    rtol=1e-4,
    atol=1e-5,
  )
  schedule = schedules.get_schedule("linear", 1000)
  model_fn, x0_spec = denoisers.as_discrete_model(denoiser, spec, schedule)
  assert x0_spec.mean_type is diffusion.MeanType.X0 and x0_spec.edm is None
  t, abar = jnp.array([5, 700]), np.asarray(schedule.alphas_cumprod)[[5, 700]][:, None, None, None]
  posterior_mean = MU + np.sqrt(abar) * S**2 / (abar * S**2 + 1 - abar) * (x - np.sqrt(abar) * MU)
  np.testing.assert_allclose(model_fn(jnp.asarray(x), t), posterior_mean, rtol=1e-4, atol=1e-5)


def test_adapters_refuse_what_they_cannot_read():
  with pytest.raises(ValueError, match="from_vp takes eps-prediction models, got mean_type 'x0'"):
    denoisers.from_vp(analytic_net, ModelSpec(mean_type="x0"))
  with pytest.raises(ValueError, match="ModelSpec.edm set"):
    denoisers.from_edm(analytic_net, ModelSpec())


# ----------------------------------------------------------------------------- preconditioning


def test_coefficients_are_table_1_and_the_loss_weight_is_unit():
  precond = edm.Preconditioning(sigma_data=0.7)
  sigma = np.array([0.002, 0.5, 3.0, 80.0])
  c = precond.coefficients(jnp.asarray(sigma, jnp.float32))
  total = sigma**2 + 0.49
  np.testing.assert_allclose(c.c_skip, 0.49 / total, rtol=1e-6)
  np.testing.assert_allclose(c.c_out, sigma * 0.7 / np.sqrt(total), rtol=1e-6)
  np.testing.assert_allclose(c.c_in, 1 / np.sqrt(total), rtol=1e-6)
  np.testing.assert_allclose(c.c_noise, np.log(sigma) / 4, rtol=1e-6)
  # lambda(sigma) c_out^2 = 1: the effective target of F has unit weight at every sigma.
  np.testing.assert_allclose(
    precond.loss_weight(jnp.asarray(sigma)) * np.square(c.c_out), 1.0, rtol=1e-5
  )
  with pytest.raises(ValueError, match="EDM sigma_data must be positive, got 0"):
    edm.Preconditioning(sigma_data=0)


def test_training_sigmas_are_lognormal_and_quartered():
  sigmas = edm.LogNormalSigmas(edm.Preconditioning())
  sigma, weights = sigmas.sample((), jax.random.key(0), 20000)
  log_sigma = np.log(np.asarray(sigma, np.float64))
  assert abs(log_sigma.mean() + 1.2) < 0.05 and abs(log_sigma.std() - 1.2) < 0.05
  np.testing.assert_array_equal(weights, 1.0)
  counts = np.bincount(np.asarray(sigmas.quarter(sigma)), minlength=4)
  np.testing.assert_allclose(counts / 20000, 0.25, atol=0.02)


# ----------------------------------------------------------------------------- training


def test_edm_settings_that_do_not_apply_are_named():
  with pytest.raises(ValueError, match="Unknown diffusion.parameterization 'karras'"):
    DiffusionConfig(parameterization="karras")
  with pytest.raises(
    ValueError, match="diffusion.loss='hybrid' does not apply with diffusion.parameterization='edm'"
  ):
    DiffusionConfig(parameterization="edm", loss="hybrid", var_type="learned_range")
  with pytest.raises(ValueError, match="diffusion.var_type='learned'.*predicts no variance"):
    DiffusionConfig(parameterization="edm", var_type="learned")
  with pytest.raises(ValueError, match="diffusion.rescale_timesteps=True does not apply"):
    DiffusionConfig(parameterization="edm", rescale_timesteps=True)
  with pytest.raises(
    ValueError, match=r"diffusion.sigma_data must be a finite number > 0, got -1.0"
  ):
    DiffusionConfig(parameterization="edm", sigma_data=-1.0)
  spec = process.model_spec(DiffusionConfig(parameterization="edm", sigma_data=0.75))
  assert spec.edm == edm.Preconditioning(sigma_data=0.75)
  with pytest.raises(ValueError, match="EDM-preconditioned"):
    losses.nll_bpd(analytic_net, spec, COSINE, jnp.zeros((1, 2, 2, 1)), jax.random.key(0))


def test_cifar10_edm_network_matches_ddpmpp_size():
  """configs/cifar10_edm.py's stand-in for EDM's DDPM++ (SongUNet at 008a4e5: 55,732,739)."""
  config = cifar10_edm.get_config()
  _, variables = zoo.abstract_init(models.get_model(dict(config.model)), (32, 32, 3))
  count = zoo.count_params(variables["params"])
  assert count == 56_524_291 and abs(count / 55_732_739 - 1) < 0.02


def test_edm_run_trains_checkpoints_and_samples_with_every_sampler(tmp_path):
  """configs/digits.py:edm,smoke through the train step, EMA and checkpoint; launch.sample
  --sampler=edm_heun on it; the discrete samplers through the x_0 view."""

  workdir = str(tmp_path / "run")
  state = loop.train_and_evaluate(digits.get_config("edm,smoke"), workdir)
  assert int(state.step) == 4
  model = runs.load_ema_for_sampling(workdir)
  assert model.spec.edm == edm.Preconditioning(sigma_data=0.75)
  for config in (
    sampling.SamplerConfig("ddim", steps=3),
    sampling.SamplerConfig("dpm_solver", steps=3),
  ):
    samples = runs.draw_samples(model, config, 8, 8, str(tmp_path / config.sampler), seed=0)
    assert samples.shape == (8, 8, 8, 1) and samples.std() > 0

  output = tmp_path / "samples"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.sample",
      f"--workdir={workdir}",
      "--num_samples=8",
      "--batch_size=8",
      "--sampler=edm_heun",
      "--steps=3",
      "--s_churn=5",
      f"--output={output}",
      "--compilation_cache=",
    ],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  samples = np.load(output / "samples.npz")["arr_0"]
  assert samples.shape == (8, 8, 8, 1) and samples.std() > 0
  assert '"s_churn": 5.0' in (output / "settings.json").read_text()
