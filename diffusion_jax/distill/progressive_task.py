"""The progressive distillation task (`task = "progressive"`): teacher, student, rounds, step.

The loop (train/loop.py) runs it through the `train.task.Task` interface. The
state is the loop's TrainState; its `sampler_state` holds this task's own
state, the frozen teacher's parameters (`DistillState`), so the teacher of
every round is checkpointed with the student and a resumed run goes on in
the round its step belongs to. Round r begins at step r * steps_per_round:
its teacher is the EMA student of round r - 1, which also restarts the
student, and the optimizer's state (so the learning-rate schedule runs
again within each round, as the paper's code anneals it per round).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from clu import metrics

from diffusion_jax import diffusion, losses, process, runs
from diffusion_jax.config.distill import ProgressiveConfig
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.distill import progressive, student, teacher
from diffusion_jax.sampling.loop import SamplingSchedule, noise_levels
from diffusion_jax.train import optimizer
from diffusion_jax.train.state import TrainMetrics, TrainState, apply_gradients, masked_average


@flax.struct.dataclass
class DistillState:
  """The task's part of the TrainState (its `sampler_state`): the current round's teacher."""

  teacher_params: Any


@dataclasses.dataclass(frozen=True)
class ProgressiveFns:
  """The static parts of the progressive train step."""

  apply: Any  # (params, x, t, y, train=, rngs=) -> output, t the training timesteps [B]
  tx: Any  # optax.GradientTransformation
  lr_schedule: Any
  ema_decay: float
  teacher_spec: ModelSpec  # how round 0's teacher (the loaded run) reads its output
  student_spec: ModelSpec  # how the student (and so the teacher of later rounds) reads its
  steps: SamplingSchedule  # the first round's teacher grid, every round's (progressive.grid)
  distill: ProgressiveConfig
  conditional: bool
  keep_last_finite: bool = True  # train.on_nonfinite == "skip" (train.state.keep_finite_update)


def _round(fns: ProgressiveFns, step: jax.Array) -> jax.Array:
  """int32 []: the round of the optimizer step after `step` completed ones."""
  return jnp.minimum(step // fns.distill.steps_per_round, fns.distill.num_rounds - 1)


def _start_round(state: TrainState, fns: ProgressiveFns) -> TrainState:
  """At a round's first step (but the first round's): the EMA student becomes the teacher and the
  new student, and the optimizer starts afresh."""
  begins = (
    (state.step > 0)
    & (state.step % fns.distill.steps_per_round == 0)
    & (state.step < fns.distill.num_steps)
  )
  ema = state.ema_params
  restarted = state.replace(
    params=ema, opt_state=fns.tx.init(ema), sampler_state=DistillState(teacher_params=ema)
  )
  return jax.tree.map(lambda new, old: jnp.where(begins, new, old), restarted, state)


def _x0(spec: ModelSpec, steps: SamplingSchedule, output, x, index) -> jax.Array:
  """The x_0 a network output predicts at grid step `index` [B] (unclipped)."""
  mean_output, _ = diffusion.split_output(spec, output)
  return diffusion.predict_x0(spec, steps.schedule, mean_output, x, index)


def loss_terms(
  fns: ProgressiveFns,
  params,
  teacher_params,
  x: jax.Array,
  noise: jax.Array,
  point: jax.Array,
  current: jax.Array,
  labels: jax.Array | None,
  dropout_key: jax.Array,
) -> losses.LossTerms:
  """[B] terms of Algorithm 2's loss in round `current` [] at grid points `point` [B].

  z_p = alpha_p x + sigma_p noise (x, noise [B, H, W, C]); the target is
  `progressive.two_step_target` of the teacher (`teacher_params`, stride
  2^current; x_0 clipped as DDIM clips it), the loss max(SNR_p, 1) |x^ - x~|^2
  of the student (`params`) at p (`progressive.loss_terms`).
  """
  alpha, sigma = noise_levels(fns.steps.schedule)
  z = diffusion.at(alpha, point, x.ndim) * x + diffusion.at(sigma, point, x.ndim) * noise

  def teacher_x0(x_t, index):
    output = fns.apply(teacher_params, x_t, fns.steps.timesteps[index], labels)
    x0 = jnp.where(
      current == 0,
      _x0(fns.teacher_spec, fns.steps, output, x_t, index),
      _x0(fns.student_spec, fns.steps, output, x_t, index),
    )
    return jnp.clip(x0, -1.0, 1.0) if fns.teacher_spec.clip_x0 else x0

  target = jax.lax.stop_gradient(
    progressive.two_step_target(teacher_x0, fns.steps, z, point, jnp.left_shift(1, current))
  )
  output = fns.apply(
    params, z, fns.steps.timesteps[point - 1], labels, train=True, rngs={"dropout": dropout_key}
  )
  return progressive.loss_terms(
    _x0(fns.student_spec, fns.steps, output, z, point - 1), target, alpha[point], sigma[point]
  )


def train_step(
  state: TrainState, batch: dict[str, jax.Array], fns: ProgressiveFns
) -> tuple[TrainState, TrainMetrics]:
  """One step of Salimans & Ho's Algorithm 2 on batch {"image": [B, H, W, C], "label": [B]}.

  In round r the student has K = start_steps / 2^(r+1) steps; a student point
  i ~ U{1..K} is grid point p = 2^(r+1) i, and the step descends the mean of
  `loss_terms` there.
  """
  state = _start_round(state, fns)
  x = batch["image"]
  labels = batch["label"] if fns.conditional else None
  point_key, noise_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
  current = _round(fns, state.step)
  stride = jnp.left_shift(1, current)
  num_points = fns.distill.start_steps // (2 * stride)  # K
  point = 2 * stride * jax.random.randint(point_key, x.shape[:1], 1, num_points + 1)
  noise = jax.random.normal(noise_key, x.shape, x.dtype)

  def loss_fn(params):
    terms = loss_terms(
      fns, params, state.sampler_state.teacher_params, x, noise, point, current, labels, dropout_key
    )
    return jnp.mean(terms.loss), terms

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, skipped, grad_norm = apply_gradients(
    state,
    grads,
    jnp.all(jnp.isfinite(terms.loss)),
    fns.tx,
    fns.ema_decay,
    keep_last_finite=fns.keep_last_finite,
  )
  finite = skipped.count == 0
  round_step = state.step - current * fns.distill.steps_per_round
  return new_state, dict(
    loss=masked_average(terms.loss, finite),
    mse=masked_average(terms.mse, finite),
    grad_norm=masked_average(grad_norm[None], finite),
    learning_rate=metrics.LastValue(total=fns.lr_schedule(round_step), count=jnp.array(1)),
    student_steps=metrics.LastValue(total=num_points.astype(jnp.float32), count=jnp.array(1)),
    skipped_steps=skipped,
  )


@dataclasses.dataclass(frozen=True)
class ProgressiveExperiment(student.StudentExperiment):
  """A progressive distillation config made concrete: the student, its teacher, the rounds.

  Its `diffusion` is the student's: its mean_type, on the teacher's process.
  """

  distill: ProgressiveConfig
  teacher: runs.EmaModel

  def step_fns(self) -> ProgressiveFns:
    tx, lr_schedule = optimizer.make_optimizer(self.optim)
    return ProgressiveFns(
      apply=runs.diffusion_apply_fn(self.model, self.diffusion),
      tx=tx,
      lr_schedule=lr_schedule,
      ema_decay=self.train.ema_decay,
      keep_last_finite=self.train.on_nonfinite == "skip",
      teacher_spec=self.teacher.spec,
      student_spec=process.model_spec(self.diffusion),
      steps=progressive.grid(self.teacher.schedule, self.distill.start_steps),
      distill=self.distill,
      conditional=self.teacher.num_classes is not None,
    )

  def train_step_fn(self):
    """The pure `(state, batch) -> (state, metrics)` the loop jits."""
    return functools.partial(train_step, fns=self.step_fns())

  def init_state(self, rng: jax.Array) -> TrainState:
    """The student as its teacher: the teacher's EMA parameters, teacher and student alike."""
    params = self.teacher.params
    return student.initial_state(
      params, self.step_fns().tx, rng, DistillState(teacher_params=params)
    )


def build(
  config: ml_collections.ConfigDict, model: nn.Module | None = None
) -> ProgressiveExperiment:
  """Checks a progressive distillation config, loads its teacher and builds the student's parts.

  `model`, when given, replaces building `config.model` with the zoo.
  """
  sections = student.student_sections(config, model, ProgressiveConfig, "progressive distillation")
  distill, num_steps = sections["distill"], sections["train"].num_steps
  if num_steps > distill.num_steps:
    raise ValueError(
      f"train.num_steps={num_steps} is past the last round:"
      f" {distill.num_rounds} rounds of distill.steps_per_round="
      f"{distill.steps_per_round} are {distill.num_steps} steps."
    )
  frozen = teacher.load(distill.teacher_workdir, config, teacher.PROGRESSIVE_SHARED_KEYS)
  if distill.start_steps > frozen.schedule.num_timesteps:
    raise ValueError(
      f"distill.start_steps={distill.start_steps} is more than the teacher's"
      f" {frozen.schedule.num_timesteps} timesteps."
    )
  return ProgressiveExperiment(**sections, teacher=frozen)
