"""The train state and the pure train step: t and noise -> q_sample -> model -> loss -> update -> EMA."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics

from diffusion_jax import losses
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.schedules import Schedule


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: checkpointed as one pytree."""

  step: jax.Array  # int32 []
  params: Any
  ema_params: Any  # exponential moving average of params, used for sampling
  opt_state: Any
  rng: jax.Array  # uint32 [2]; the step's key is fold_in(rng, step)
  sampler_state: Any  # the timestep sampler's state (loss history, or ())


# Metric name -> clu metric, accumulated on device between logs: loss, mse, vb, grad_norm,
# learning_rate, and loss_q<i>, the loss in the i-th quarter of [0, T).
TrainMetrics = dict[str, metrics.Metric]


def merge_metrics(accumulated: TrainMetrics | None, new: TrainMetrics) -> TrainMetrics:
  """Merges one step's metrics into the running ones (device arrays only: no sync)."""
  if accumulated is None:
    return new
  return {name: accumulated[name].merge(metric) for name, metric in new.items()}


def compute_metrics(accumulated: TrainMetrics) -> dict[str, float]:
  """The logged values; fetches them from the device."""
  return jax.device_get({name: metric.compute() for name, metric in accumulated.items()})


@dataclasses.dataclass(frozen=True)
class StepFns:
  """The static parts of a train step: what to apply, how to read it, what to minimise."""

  # (params, x_t, t, y, train=, rngs=) -> output: Experiment.model_apply, which maps t to the
  # network's timesteps.
  apply: Callable[..., jax.Array]
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  spec: ModelSpec
  schedule: Schedule
  loss_type: losses.LossType
  timestep_sampler: Any  # losses.UniformSampler | losses.LossAwareSampler
  ema_decay: float
  class_conditional: bool


def _average(values, mask=None):
  mask = jnp.ones_like(values) if mask is None else mask
  return metrics.Average(total=jnp.sum(values * mask), count=jnp.sum(mask))


def _metrics(fns: StepFns, terms: losses.LossTerms, t, grad_norm, step) -> TrainMetrics:
  quarter = t * 4 // fns.schedule.num_timesteps  # [B] in 0..3
  per_quarter = {f"loss_q{q}": _average(terms.loss, (quarter == q).astype(jnp.float32))
                 for q in range(4)}
  return dict(
      loss=_average(terms.loss), mse=_average(terms.mse), vb=_average(terms.vb),
      grad_norm=_average(grad_norm[None]),
      learning_rate=metrics.LastValue(total=fns.lr_schedule(step), count=jnp.array(1)),
      **per_quarter)


def train_step(state: TrainState, batch: dict[str, jax.Array], fns: StepFns
               ) -> tuple[TrainState, TrainMetrics]:
  """One optimizer step on batch {"image": [B, H, W, C] in [-1, 1], "label": int [B]}.

  Pure, with no host sync: jit it with `fns` closed over (see `loop.compile_train_step`).
  The loss is Ho et al. eq. 14 (simple), or Improved DDPM's hybrid or vlb,
  weighted by the timestep sampler's importance weights.
  """
  x_start = batch["image"]
  labels = batch["label"] if fns.class_conditional else None
  t_key, noise_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
  t, weights = fns.timestep_sampler.sample(state.sampler_state, t_key, x_start.shape[0])
  noise = jax.random.normal(noise_key, x_start.shape, x_start.dtype)

  def loss_fn(params):
    def model_fn(x_t, t):
      return fns.apply(params, x_t, t, labels, train=True, rngs={"dropout": dropout_key})
    terms = losses.training_losses(model_fn, fns.spec, fns.schedule, fns.loss_type,
                                   x_start, t, noise)
    return jnp.mean(terms.loss * weights), terms

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = fns.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - fns.ema_decay)
  new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
      sampler_state=fns.timestep_sampler.update(state.sampler_state, t, terms.loss))
  return new_state, _metrics(fns, terms, t, optax.tree.norm(grads), state.step)
