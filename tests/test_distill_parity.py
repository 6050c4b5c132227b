"""Parity of the few-step tasks with the papers' code: one step's loss on fixed inputs, within 1e-5.

Each reference below is an independent NumPy re-statement (float64) of the
procedure of the papers' code at a pinned commit, read for its semantics:
- CM: openai/consistency_models_cifar10 @ d086e77dfdc30b51671685f9eec90c90d4f4eaa6
  (jcm/losses.py, jcm/models/utils.py, jcm/sde_lib.py);
- progressive distillation: google-research/google-research @
  ff098598e79036b5d6861568282dcd5ea0464e9e
  (diffusion_distillation/diffusion_distillation/dpm.py).
Ours runs through the tasks' pure `loss_terms` on the same data, noise, levels
and network function; no key is drawn on either side. Both references leave
x_0 unclipped in the teacher, so our teachers here have diffusion.clip_x0 off
(ours clips it where the teacher's run does, as its sampler does).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from diffusion_jax import consistency, edm, process, runs, schedules
from diffusion_jax.config.diffusion import DiffusionConfig
from diffusion_jax.config.distill import ConsistencyConfig, ProgressiveConfig
from diffusion_jax.distill import consistency_task, progressive, progressive_task
from diffusion_jax.sampling.loop import noise_levels

T_MIN, T_MAX, RHO, DATA_STD = 0.002, 80.0, 7.0, 0.5  # CM's KVESDE (jcm/sde_lib.py)
TOLERANCE = 1e-5
SHAPE = (4, 4, 4, 3)


def _data(seed=0):
  """Fixed x in [-1, 1] and noise z, [B, H, W, C] float64."""
  rng = np.random.default_rng(seed)
  return np.tanh(rng.normal(size=SHAPE)), rng.normal(size=SHAPE)


def _network(params, x_in, level):
  """A fixed non-linear stand-in for the network: F(x_in [B, ...], level [B]) (NumPy or JAX)."""
  xp = jnp if isinstance(x_in, jax.Array) else np
  level = level.reshape(-1, *([1] * (x_in.ndim - 1)))
  return xp.tanh(params[0] * x_in + params[1] * level) + params[2] * x_in * x_in


def _apply(params, x_in, level, labels=None, **unused_train_and_rngs):
  """The stand-in as the tasks call their network: (params, x, level [B], y, train=, rngs=)."""
  return _network(params, x_in, jnp.asarray(level, jnp.float32))


STUDENT, TARGET, TEACHER = (
  jnp.array(p) for p in ([0.8, 0.3, 0.1], [0.7, -0.2, 0.15], [1.1, 0.5, -0.05])
)

# ----------------------------------------------------------------------------- CM's formulas


def _cm_time(index, num_scales):
  """jcm/losses.py, get_consistency_loss_fn.loss_fn: level `index` of N, counted down from t_max."""
  top, bottom = T_MAX ** (1 / RHO), T_MIN ** (1 / RHO)
  return (top + index / (num_scales - 1) * (bottom - top)) ** RHO


def _cm_precond(params, x, t, shift):
  """jcm/models/utils.py: get_denoiser_fn (shift 0) and get_distiller_fn (shift = pred_t = t_min)."""
  t = t.reshape(-1, 1, 1, 1)
  out = _network(np.asarray(params, np.float64), x / np.sqrt(t**2 + DATA_STD**2), 0.25 * np.log(t))
  return x * DATA_STD**2 / ((t - shift) ** 2 + DATA_STD**2) + out * (
    t - shift
  ) * DATA_STD / np.sqrt(t**2 + DATA_STD**2)


def _cm_heun(denoise, x, t, next_t):
  """jcm/losses.py, get_consistency_loss_fn.heun_solver."""
  t, next_t = t.reshape(-1, 1, 1, 1), next_t.reshape(-1, 1, 1, 1)
  d = (x - denoise(x, t.ravel())) / t
  samples = x + (next_t - t) * d
  next_d = (samples - denoise(samples, next_t.ravel())) / next_t
  return x + (next_t - t) / 2 * (d + next_d)


def _cm_loss(x, z, indices, num_scales, denoise, params, target_params):
  """jcm/losses.py, get_consistency_loss_fn.loss_fn with norm "l2" and weighting "uniform":
  per-example losses [B] and the levels t > t2 [B]. `denoise` None is CT (dsm_target: x itself)."""
  t, t2 = _cm_time(indices, num_scales), _cm_time(indices + 1, num_scales)
  x_t = x + t.reshape(-1, 1, 1, 1) * z
  ft = _cm_precond(params, x_t, t, T_MIN)
  x_t2 = _cm_heun(denoise or (lambda samples, level: x), x_t, t, t2)
  ft2 = _cm_precond(target_params, x_t2, t2, T_MIN)
  return np.mean(((ft - ft2) ** 2).reshape(len(x), -1), axis=-1), t, t2


def _consistency_fns(method, metric, teacher=None):
  return consistency_task.ConsistencyFns(
    apply=_apply,
    precond=consistency.ConsistencyPreconditioning(sigma_data=DATA_STD),
    tx=None,
    lr_schedule=None,
    ema_decay=0.0,
    distill=ConsistencyConfig(method=method, metric=metric),
    total_steps=1,
    teacher=teacher,
    conditional=False,
  )


def _ours(fns, x, z, t, t2, params, target_params, teacher_params=()):
  """Our loss at sigma_{n+1} = t, sigma_n = t2: mean lambda d, and d [B]."""
  weight, distance = consistency_task.loss_terms(
    fns,
    params,
    target_params,
    teacher_params,
    jnp.asarray(x, jnp.float32),
    jnp.asarray(z, jnp.float32),
    jnp.asarray(t2, jnp.float32),
    jnp.asarray(t, jnp.float32),
    None,
    jax.random.key(0),
  )
  return float(jnp.mean(weight * distance)), np.asarray(distance)


@pytest.mark.parametrize("num_scales", [18, 11, 1281])
def test_karras_levels_are_cms(num_scales):
  ours = consistency.karras_boundaries(num_scales, num_scales + 3)
  reference = _cm_time(np.arange(num_scales), num_scales)[::-1]
  np.testing.assert_allclose(ours[:num_scales], reference, rtol=TOLERANCE)
  np.testing.assert_allclose(ours[num_scales:], T_MAX, rtol=TOLERANCE)


def test_consistency_function_and_edm_denoiser_are_cms():
  """f = c_skip x + c_out F(c_in x, c_noise) against get_distiller_fn; EDM's D against
  get_denoiser_fn (CD's teacher), at levels from sigma_min to sigma_max."""
  x, _ = _data()
  t = np.array([T_MIN, 0.01, 1.3, 80.0])
  net = lambda x_in, c_noise: _apply(STUDENT, x_in, c_noise)
  for precond, shift in (
    (consistency.ConsistencyPreconditioning(sigma_data=DATA_STD), T_MIN),
    (edm.Preconditioning(sigma_data=DATA_STD), 0.0),
  ):
    ours = precond.denoise(net, jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(ours, _cm_precond(STUDENT, x, t, shift), atol=TOLERANCE)


def test_cd_loss_is_cms():
  """CD (CM Algorithm 2; configs/cifar10_ve_cd.py but l2): Heun on the EDM teacher, theta- target."""
  x, z = _data()
  indices = np.array([0, 5, 11, 16])  # of N = 18: the top pair to the bottom one
  teacher_spec = process.model_spec(DiffusionConfig(parameterization="edm", clip_x0=False))
  teacher = runs.EmaModel(
    apply_fn=_apply,
    params=TEACHER,
    spec=teacher_spec,
    schedule=None,
    image_shape=SHAPE[1:],
    num_classes=None,
    step=0,
  )
  reference, t, t2 = _cm_loss(
    x,
    z,
    indices,
    18,
    lambda samples, level: _cm_precond(TEACHER, samples, level, 0.0),
    STUDENT,
    TARGET,
  )
  loss, distance = _ours(
    _consistency_fns("cd", "l2", teacher), x, z, t, t2, STUDENT, TARGET, TEACHER
  )
  np.testing.assert_allclose(distance, reference, rtol=TOLERANCE, atol=1e-7)
  np.testing.assert_allclose(loss, np.mean(reference), rtol=TOLERANCE)


@pytest.mark.parametrize("metric", ["l2", "pseudo_huber"])
def test_ict_loss_is_cms_ct_with_icts_weight_and_metric(metric):
  """iCT = CM's CT (dsm_target: x_n and x_{n+1} share z; stopgrad target) with the student as its
  own target, iCT's weight 1 / (sigma_{n+1} - sigma_n) (sec. 3.5) and, for "pseudo_huber",
  iCT's metric sqrt(|a - b|^2 + c^2) - c, c = 0.00054 sqrt(d) (sec. 3.3), which CM's code lacks."""
  x, z = _data(1)
  num_scales = 41
  indices = np.array([0, 9, 25, 39])
  per_pixel, t, t2 = _cm_loss(x, z, indices, num_scales, None, STUDENT, STUDENT)
  distance = per_pixel
  if metric == "pseudo_huber":
    c = 0.00054 * np.sqrt(np.prod(SHAPE[1:]))
    distance = np.sqrt(per_pixel * np.prod(SHAPE[1:]) + c**2) - c
  reference = np.mean(distance / (t - t2))
  loss, ours = _ours(_consistency_fns("ict", metric), x, z, t, t2, STUDENT, STUDENT)
  np.testing.assert_allclose(ours, distance, rtol=TOLERANCE, atol=1e-7)
  np.testing.assert_allclose(loss, reference, rtol=TOLERANCE)


# --------------------------------------------------------- progressive distillation's formulas


def _sigmoid(v):
  return 1 / (1 + np.exp(-v))


def _pd_x_from_eps(z, eps, logsnr):
  """dpm.py predict_x_from_eps: x = (z - sigma eps) / alpha, in logsnr."""
  return np.sqrt(1 + np.exp(-logsnr)) * (z - eps / np.sqrt(1 + np.exp(logsnr)))


def _pd_eps_from_x(z, x, logsnr):
  """dpm.py predict_eps_from_x."""
  return np.sqrt(1 + np.exp(logsnr)) * (z - x / np.sqrt(1 + np.exp(-logsnr)))


def _pd_x_from_v(z, v, logsnr):
  """dpm.py predict_x_from_v."""
  return np.sqrt(_sigmoid(logsnr)) * z - np.sqrt(_sigmoid(-logsnr)) * v


def _pd_run_model(params, z, logsnr, mean_type):
  """dpm.py Model._run_model with clip_x=False: (model_x, model_eps)."""
  logsnr = logsnr.reshape(-1, 1, 1, 1)
  out = _network(np.asarray(params, np.float64), z, logsnr.ravel())
  x = _pd_x_from_eps(z, out, logsnr) if mean_type == "eps" else _pd_x_from_v(z, out, logsnr)
  return x, _pd_eps_from_x(z, x, logsnr)


def _pd_loss(x, eps, logsnr, logsnr_mid, logsnr_s, last, teacher_mean_type):
  """dpm.py Model.training_losses with a teacher (target_model_fn), a v student and
  mean_loss_weight_type "snr_trunc": the per-example loss [B]. `last` [B]: the student's step
  i == 0 (onto the data), where the target is the teacher's x at the mid point."""
  bc = lambda v: v.reshape(-1, 1, 1, 1)
  z = np.sqrt(_sigmoid(bc(logsnr))) * x + np.sqrt(_sigmoid(-bc(logsnr))) * eps
  x_pred, eps_pred = _pd_run_model(TEACHER, z, logsnr, teacher_mean_type)
  z_mid = np.sqrt(_sigmoid(bc(logsnr_mid))) * x_pred + np.sqrt(_sigmoid(-bc(logsnr_mid))) * eps_pred
  x_pred, eps_pred = _pd_run_model(TEACHER, z_mid, logsnr_mid, teacher_mean_type)
  with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # logsnr_s = inf at `last`
    a_s, a_t = np.sqrt(_sigmoid(bc(logsnr_s))), np.sqrt(_sigmoid(bc(logsnr)))
    z_teacher = a_s * x_pred + np.sqrt(_sigmoid(-bc(logsnr_s))) * eps_pred
    stdv_frac = np.exp(0.5 * (np.logaddexp(0, bc(logsnr)) - np.logaddexp(0, bc(logsnr_s))))
    x_target = np.where(bc(last), x_pred, (z_teacher - stdv_frac * z) / (a_s - stdv_frac * a_t))
  eps_target = _pd_eps_from_x(z, x_target, bc(logsnr))
  model_x, model_eps = _pd_run_model(STUDENT, z, logsnr, "v")
  meanflat = lambda v: np.mean(v.reshape(len(v), -1), axis=-1)
  return np.maximum(meanflat((model_x - x_target) ** 2), meanflat((model_eps - eps_target) ** 2))


@pytest.mark.parametrize("current", [0, 1])
def test_progressive_distillation_loss_is_the_papers_codes(current):
  """Round 0 (an eps teacher, the loaded run) and round 1 (the v student its own teacher) on an
  8-point cosine grid; the points include the last student step, onto the data."""
  steps = progressive.grid(schedules.get_schedule("cosine", 1000), 8)
  alpha, sigma = (np.asarray(a, np.float64) for a in noise_levels(steps.schedule))
  with np.errstate(divide="ignore"):
    logsnr = 2 * np.log(alpha / sigma)  # [N + 1]: inf at point 0, the data
  # The stand-in network reads the logSNR of the timestep it is given (ours: the teacher's t).
  table = jnp.zeros(1000).at[steps.timesteps].set(jnp.asarray(logsnr[1:], jnp.float32))
  apply = lambda params, x_t, t, labels=None, **kw: _network(params, x_t, table[t])
  spec = lambda mean_type: process.model_spec(DiffusionConfig(mean_type=mean_type, clip_x0=False))
  fns = progressive_task.ProgressiveFns(
    apply=apply,
    tx=None,
    lr_schedule=None,
    ema_decay=0.0,
    teacher_spec=spec("epsilon" if current == 0 else "v"),
    student_spec=spec("v"),
    steps=steps,
    distill=ProgressiveConfig(start_steps=8, end_steps=1, steps_per_round=1),
    conditional=False,
  )
  stride = 1 << current
  point = np.array({0: [2, 4, 6, 8], 1: [4, 8, 4, 8]}[current])  # the student's step i = point - 1
  x, noise = _data(2)
  ours = progressive_task.loss_terms(
    fns,
    STUDENT,
    TEACHER,
    jnp.asarray(x, jnp.float32),
    jnp.asarray(noise, jnp.float32),
    jnp.asarray(point),
    jnp.asarray(current),
    None,
    jax.random.key(0),
  )
  reference = _pd_loss(
    x,
    noise,
    logsnr[point],
    logsnr[point - stride],
    logsnr[point - 2 * stride],
    point == 2 * stride,
    "eps" if current == 0 else "v",
  )
  np.testing.assert_allclose(ours.loss, reference, rtol=TOLERANCE, atol=1e-7)
