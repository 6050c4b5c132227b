"""The consistency task (`task = "consistency"`): consistency distillation (CD) or iCT.

The student is a consistency function f(x, sigma) (consistency.py): the
network of an EDM-preconditioned run with CM's boundary coefficients, i.e. a
run whose diffusion.parameterization is "consistency", sampled by
`--sampler=consistency --steps=1|2|4`. CD (Song et al. 2023, Algorithm 2)
starts it from a frozen teacher run and keeps an EMA target network; iCT
(Song & Dhariwal 2023) trains it from scratch against itself. The TrainState's
`sampler_state` holds this task's state (`ConsistencyState`), checkpointed
with the rest; its `ema_params` are the sampling EMA. With distill.metric
"lpips" the LPIPS network's variables (evaluation/lpips.py, read from the
user's torch files when the run starts) are part of that state too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics

from diffusion_jax import consistency, edm, process, runs
from diffusion_jax.config.distill import ConsistencyConfig
from diffusion_jax.distill import student, teacher
from diffusion_jax.evaluation import lpips
from diffusion_jax.train import optimizer
from diffusion_jax.train.state import (
  TrainMetrics,
  TrainState,
  apply_gradients,
  masked_average,
  select_tree,
)


@flax.struct.dataclass
class ConsistencyState:
  """The task's part of the TrainState: CD's frozen teacher and target network (() for iCT),
  and the fixed LPIPS variables of distill.metric "lpips" (() for the other metrics)."""

  teacher_params: Any
  target_params: Any  # theta^-: an EMA of the student at rate distill.target_ema
  lpips_params: Any  # distill.metric "lpips": the LPIPS network's variables, fixed


@dataclasses.dataclass(frozen=True)
class ConsistencyFns:
  """The static parts of the consistency train step."""

  apply: Callable[..., jax.Array]  # (params, x_in, c_noise, y, train=, rngs=) -> F
  precond: consistency.ConsistencyPreconditioning
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  ema_decay: float
  distill: ConsistencyConfig
  total_steps: int  # K of iCT's N(k)
  teacher: runs.EmaModel | None  # CD's teacher (its parameters live in the state)
  conditional: bool
  keep_last_finite: bool = True  # train.on_nonfinite == "skip" (train.state.keep_finite_update)


def num_scales(fns: ConsistencyFns, step: jax.Array) -> jax.Array:
  """N at the step after `step` completed ones: CD's fixed N, or iCT's curriculum N(k)."""
  if fns.distill.method == "cd":
    return jnp.asarray(fns.distill.num_scales, jnp.int32)
  return consistency.ict_num_scales(
    step, fns.total_steps, fns.distill.scales_start, fns.distill.scales_end
  )


def _levels(fns: ConsistencyFns, key: jax.Array, step: jax.Array, batch_size: int):
  """(sigma_n [B], sigma_{n+1} [B], N []): adjacent levels, n uniform (CD) or lognormal (iCT)."""
  count = num_scales(fns, step)
  sigmas = consistency.karras_boundaries(count, fns.distill.max_scales)
  if fns.distill.method == "cd":
    n = jax.random.randint(key, (batch_size,), 0, count - 1)
  else:
    logits = consistency.lognormal_level_logits(
      sigmas, count, fns.precond.p_mean, fns.precond.p_std
    )
    n = jax.random.categorical(key, logits, shape=(batch_size,))
  return sigmas[n], sigmas[n + 1], count


def metric_fn(
  distill: ConsistencyConfig, lpips_params: Any
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """d(x [B, H, W, C], y [B, H, W, C]) -> [B]: distill.metric; LPIPS with `lpips_params`."""
  if distill.metric == "lpips":
    return functools.partial(lpips.distance, lpips_params, resolution=distill.lpips_resolution)
  if distill.metric == "pseudo_huber":
    return functools.partial(consistency.pseudo_huber, scale=distill.huber_scale)
  return consistency.squared_l2


def loss_terms(
  fns: ConsistencyFns,
  params,
  target_params,
  teacher_params,
  x: jax.Array,
  z: jax.Array,
  sigma: jax.Array,
  sigma_next: jax.Array,
  labels: jax.Array | None,
  dropout_key: jax.Array,
  lpips_params: Any = (),
) -> tuple[jax.Array, jax.Array]:
  """(lambda(sigma_n) [B], d [B]): CM's loss at levels sigma_n < sigma_{n+1} [B], noise z.

  x_{n+1} = x + sigma_{n+1} z (x [B, H, W, C] in [-1, 1]); x_n is one Heun step
  of the teacher (`teacher_params`) from it (CD, Algorithm 2), or x + sigma_n z
  with the same z (iCT); d is the distill.metric between f_params(x_{n+1},
  sigma_{n+1}) and f_target_params(x_n, sigma_n) without gradient; lambda is 1
  (CD) or 1 / (sigma_{n+1} - sigma_n) (iCT). Both calls of f share the dropout mask.
  `lpips_params`: the LPIPS variables d reads when distill.metric is "lpips".
  """
  x_next = x + edm.per_example(sigma_next, x.ndim) * z

  def f(params, x_t, levels):
    net_fn = lambda x_in, c_noise: fns.apply(
      params, x_in, c_noise, labels, train=True, rngs={"dropout": dropout_key}
    )
    return fns.precond.denoise(net_fn, x_t, levels)

  if fns.distill.method == "cd":
    solver = teacher.denoiser(fns.teacher, teacher_params, labels)
    x_cur = consistency.heun_step(solver.denoise, x_next, sigma_next, sigma)
    weight = jnp.ones_like(sigma)
  else:
    x_cur = x + edm.per_example(sigma, x.ndim) * z
    weight = 1.0 / (sigma_next - sigma)
  target = jax.lax.stop_gradient(f(target_params, x_cur, sigma))
  return weight, metric_fn(fns.distill, lpips_params)(f(params, x_next, sigma_next), target)


def train_step(
  state: TrainState, batch: dict[str, jax.Array], fns: ConsistencyFns
) -> tuple[TrainState, TrainMetrics]:
  """One consistency step on batch {"image": [B, H, W, C] in [-1, 1], "label": [B]}.

  Draws the levels (`_levels`) and the noise z, and descends the mean of
  `loss_terms`; the target network is theta- (CD: an EMA of theta, updated
  after the step) or theta itself (iCT).
  """
  x = batch["image"]
  labels = batch["label"] if fns.conditional else None
  level_key, noise_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
  sigma, sigma_next, count = _levels(fns, level_key, state.step, x.shape[0])
  z = jax.random.normal(noise_key, x.shape, x.dtype)
  target_params = state.sampler_state.target_params if fns.distill.method == "cd" else state.params

  def loss_fn(params):
    weight, distance = loss_terms(
      fns,
      params,
      target_params,
      state.sampler_state.teacher_params,
      x,
      z,
      sigma,
      sigma_next,
      labels,
      dropout_key,
      state.sampler_state.lpips_params,
    )
    return jnp.mean(weight * distance), (weight, distance)

  (loss, (weight, distance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, skipped, grad_norm = apply_gradients(
    state, grads, jnp.isfinite(loss), fns.tx, fns.ema_decay, keep_last_finite=fns.keep_last_finite
  )
  finite = skipped.count == 0
  if fns.distill.method == "cd":  # theta- <- mu theta- + (1 - mu) theta, after the update
    target_params = optax.incremental_update(
      new_state.params, state.sampler_state.target_params, 1.0 - fns.distill.target_ema
    )
    if fns.keep_last_finite:
      target_params = select_tree(finite, target_params, state.sampler_state.target_params)
    new_state = new_state.replace(
      sampler_state=state.sampler_state.replace(target_params=target_params)
    )
  return new_state, dict(
    loss=masked_average(weight * distance, finite),
    distance=masked_average(distance, finite),
    grad_norm=masked_average(grad_norm[None], finite),
    learning_rate=metrics.LastValue(total=fns.lr_schedule(state.step), count=jnp.array(1)),
    num_scales=metrics.LastValue(total=count.astype(jnp.float32), count=jnp.array(1)),
    skipped_steps=skipped,
  )


@dataclasses.dataclass(frozen=True)
class ConsistencyExperiment(student.StudentExperiment):
  """A consistency config made concrete: the student, CD's teacher, the discretisation.

  Its `diffusion` has parameterization "consistency": sigma_data, iCT's p_mean and p_std.
  """

  distill: ConsistencyConfig
  teacher: runs.EmaModel | None  # CD's; None for iCT
  lpips_params: Any  # distill.metric "lpips": the LPIPS network's variables; () otherwise

  def step_fns(self) -> ConsistencyFns:
    tx, lr_schedule = optimizer.make_optimizer(self.optim)
    return ConsistencyFns(
      apply=runs.diffusion_apply_fn(self.model, self.diffusion),
      precond=process.model_spec(self.diffusion).edm,
      tx=tx,
      lr_schedule=lr_schedule,
      ema_decay=self.train.ema_decay,
      keep_last_finite=self.train.on_nonfinite == "skip",
      distill=self.distill,
      total_steps=self.train.num_steps,
      teacher=self.teacher,
      conditional=getattr(self.model, "num_classes", None) is not None,
    )

  def train_step_fn(self):
    """The pure `(state, batch) -> (state, metrics)` the loop jits."""
    return functools.partial(train_step, fns=self.step_fns())

  def init_state(self, rng: jax.Array) -> TrainState:
    """CD: the student, its target and EMA start as the teacher; iCT: a fresh network."""
    init_key, state_key = jax.random.split(rng)
    if self.teacher is not None:
      params = self.teacher.params
      task_state = ConsistencyState(
        teacher_params=params, target_params=params, lpips_params=self.lpips_params
      )
    else:
      image_shape = runs.image_shape(self.data)
      params = self.model.init(init_key, *runs.example_inputs(self.model, image_shape))["params"]
      task_state = ConsistencyState(
        teacher_params=(), target_params=(), lpips_params=self.lpips_params
      )
    return student.initial_state(params, self.step_fns().tx, state_key, task_state)


def build(
  config: ml_collections.ConfigDict, model: nn.Module | None = None
) -> ConsistencyExperiment:
  """Checks a consistency config, loads CD's teacher and the LPIPS weights, builds the student.

  `model`, when given, replaces building `config.model` with the zoo.
  """
  sections = student.student_sections(config, model, ConsistencyConfig, "consistency training")
  parameterization = sections["diffusion"].parameterization
  if parameterization != "consistency":
    raise ValueError(
      f"diffusion.parameterization={parameterization!r}: a consistency"
      " run's network is a consistency function; set it to 'consistency'."
    )
  frozen = None
  if sections["distill"].method == "cd":
    frozen = teacher.load(
      sections["distill"].teacher_workdir, config, teacher.CONSISTENCY_SHARED_KEYS
    )
  distill = sections["distill"]
  lpips_params = ()
  if distill.metric == "lpips":
    lpips_params = lpips.load_lpips(*filter(None, (distill.lpips_weights, distill.vgg_weights)))
  return ConsistencyExperiment(**sections, teacher=frozen, lpips_params=lpips_params)
