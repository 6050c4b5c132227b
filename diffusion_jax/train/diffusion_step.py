"""The diffusion task's pure train step: t and noise -> q_sample -> model -> loss -> update -> EMA."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from clu import metrics

from diffusion_jax import edm, losses
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.schedules import Schedule
from diffusion_jax.train.state import TrainMetrics, TrainState, apply_gradients, masked_average


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
  # losses.UniformSampler | losses.LossAwareSampler (timesteps t), or edm.LogNormalSigmas
  # (noise levels sigma, when spec.edm is set).
  timestep_sampler: Any
  ema_decay: float
  # Labels 0..num_classes-1, and num_classes the null label of classifier-free guidance;
  # None: an unconditional model.
  num_classes: int | None = None
  label_dropout: float = 0.0  # p_uncond: probability of training a label as the null label
  min_snr_gamma: float | None = None  # min-SNR-gamma weighting of the MSE; None: unweighted
  grad_accum_steps: int = 1  # microbatches per optimizer update
  keep_last_finite: bool = True  # train.on_nonfinite == "skip" (train.state.keep_finite_update)


def _metrics(fns: StepFns, terms: losses.LossTerms, t, grad_norm, step, finite) -> TrainMetrics:
  quarter = fns.timestep_sampler.quarter(t)  # [B] in 0..3
  per_quarter = {
    f"loss_q{q}": masked_average(terms.loss, (quarter == q) & finite) for q in range(4)
  }
  return dict(
    loss=masked_average(terms.loss, finite),
    mse=masked_average(terms.mse, finite),
    vb=masked_average(terms.vb, finite),
    grad_norm=masked_average(grad_norm[None], finite),
    learning_rate=metrics.LastValue(total=fns.lr_schedule(step), count=jnp.array(1)),
    **per_quarter,
  )


def drop_labels(labels: jax.Array, key: jax.Array, p_uncond: float, null_label: int) -> jax.Array:
  """Each label [B] replaced by `null_label` with probability p_uncond (Ho & Salimans 2022, Alg. 1).

  Trains the unconditional branch that classifier-free guidance samples with.
  """
  return jnp.where(jax.random.bernoulli(key, p_uncond, labels.shape), null_label, labels)


def split_microbatches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...], microbatch j holding examples j, j+k, j+2k, ...

  Strided rather than contiguous so that each microbatch keeps the batch's
  split over the "data" axis: every device works on every microbatch.
  """
  return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
  """The inverse of `split_microbatches`: [k, B/k, ...] -> [B, ...] in the batch's order."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _grads(params, examples, dropout_key, fns: StepFns):
  """-> (gradient of mean(weights * loss), per-example LossTerms) on (x_0, t, eps, weights, y)."""
  x_start, t, noise, weights, labels = examples

  def loss_fn(params):
    def model_fn(x_t, t):
      return fns.apply(params, x_t, t, labels, train=True, rngs={"dropout": dropout_key})

    if fns.spec.edm:  # t holds the noise levels sigma
      terms = edm.training_losses(model_fn, fns.spec.edm, x_start, t, noise)
    else:
      terms = losses.training_losses(
        model_fn,
        fns.spec,
        fns.schedule,
        fns.loss_type,
        x_start,
        t,
        noise,
        min_snr_gamma=fns.min_snr_gamma,
      )
    return jnp.mean(terms.loss * weights), terms

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, terms


def _accumulated_grads(params, examples, dropout_key, fns: StepFns):
  """`_grads` averaged over fns.grad_accum_steps microbatches of `examples`, in one lax.scan.

  Equal microbatches make the mean of their mean losses the batch's mean loss,
  so the update equals one step on the whole batch; the terms come back [B].
  """
  k = fns.grad_accum_steps
  if k == 1:
    return _grads(params, examples, dropout_key, fns)

  def accumulate(grad_sum, index_and_microbatch):
    index, microbatch = index_and_microbatch
    grads, terms = _grads(params, microbatch, jax.random.fold_in(dropout_key, index), fns)
    return jax.tree.map(jnp.add, grad_sum, grads), terms

  microbatches = jax.tree.map(lambda x: split_microbatches(x, k), examples)
  grad_sum, terms = jax.lax.scan(
    accumulate, jax.tree.map(jnp.zeros_like, params), (jnp.arange(k), microbatches)
  )
  return jax.tree.map(lambda g: g / k, grad_sum), jax.tree.map(merge_microbatches, terms)


def train_step(
  state: TrainState, batch: dict[str, jax.Array], fns: StepFns
) -> tuple[TrainState, TrainMetrics]:
  """One optimizer step on batch {"image": [B, H, W, C] in [-1, 1], "label": int [B]}.

  Pure, with no host sync: jit it with `fns` closed over (see `loop.compile_train_step`).
  The loss is Ho et al. eq. 14 (simple), or Improved DDPM's hybrid or vlb,
  weighted by the timestep sampler's importance weights. t, the noise and the
  dropped labels are drawn for the whole batch, then the gradient is
  accumulated over fns.grad_accum_steps microbatches, and the timestep sampler
  sees every example's loss.

  A step with a non-finite loss, gradient, or updated parameters or EMA is
  counted in skipped_steps instead of the means (`state.keep_finite_update`).
  With fns.keep_last_finite (train.on_nonfinite="skip") it changes nothing but
  the step counter, and the next step draws new noise (its key folds in the
  new counter) on the next batch; otherwise the loop stops at its next look.
  """
  x_start = batch["image"]
  t_key, noise_key, dropout_key, label_key = jax.random.split(
    jax.random.fold_in(state.rng, state.step), 4
  )
  t, weights = fns.timestep_sampler.sample(state.sampler_state, t_key, x_start.shape[0])
  noise = jax.random.normal(noise_key, x_start.shape, x_start.dtype)
  labels = batch["label"] if fns.num_classes is not None else None
  if fns.label_dropout:
    labels = drop_labels(labels, label_key, fns.label_dropout, null_label=fns.num_classes)
  grads, terms = _accumulated_grads(
    state.params, (x_start, t, noise, weights, labels), dropout_key, fns
  )
  new_state, skipped, grad_norm = apply_gradients(
    state,
    grads,
    jnp.all(jnp.isfinite(terms.loss)),
    fns.tx,
    fns.ema_decay,
    keep_last_finite=fns.keep_last_finite,
    sampler_state=fns.timestep_sampler.update(state.sampler_state, t, terms.loss),
  )
  return new_state, dict(
    _metrics(fns, terms, t, grad_norm, state.step, skipped.count == 0), skipped_steps=skipped
  )
