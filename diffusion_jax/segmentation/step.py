"""The segmentation loss (Ronneberger et al. 2015, Sec. 3 eq. 1) and the pure train step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from clu import metrics

from diffusion_jax.train.step import TrainMetrics, TrainState, keep_finite_update


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """The mean over pixels of w(x) * -log p_l(x)(x): eq. 1 with a pixel-wise softmax.

  Args:
    logits: [B, H, W, K], the network's final feature map.
    labels: int [B, H, W], the true class l(x) of each pixel.
    weights: [B, H, W], the weight map w(x) (`weights.weight_map`).
  """
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  return jnp.mean(weights * cross_entropy)


@dataclasses.dataclass(frozen=True)
class SegmentationStepFns:
  """The static parts of a segmentation train step."""

  apply: Callable[..., jax.Array]  # (params, images [B, T, T, C]) -> logits [B, O, O, K]
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  ema_decay: float


def _average(values: jax.Array) -> metrics.Average:
  return metrics.Average(total=jnp.sum(values), count=jnp.array(values.size, jnp.int32))


def train_step(state: TrainState, batch: dict[str, jax.Array], fns: SegmentationStepFns
               ) -> tuple[TrainState, TrainMetrics]:
  """One optimizer step on {"image": [B, T, T, C], "mask": int [B, O, O], "weights": [B, O, O]}.

  Pure, with no host sync. Metrics: the weighted loss, the plain cross-entropy,
  the batch's pixel accuracy, the gradient norm, the learning rate and
  skipped_steps (a non-finite loss or gradient leaves the state as it was).
  """
  def loss_fn(params):
    logits = fns.apply(params, batch["image"])
    return weighted_cross_entropy(logits, batch["mask"], batch["weights"]), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = fns.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - fns.ema_decay)
  correct = (jnp.argmax(logits, -1) == batch["mask"]).astype(jnp.float32)
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["mask"])
  step_metrics = dict(
      loss=_average(loss[None]), cross_entropy=_average(cross_entropy),
      pixel_accuracy=_average(correct), grad_norm=_average(grad_norm[None]),
      learning_rate=metrics.LastValue(total=fns.lr_schedule(state.step), count=jnp.array(1)))
  new_state, step_metrics["skipped_steps"] = keep_finite_update(
      state, state.replace(params=params, ema_params=ema_params, opt_state=opt_state),
      jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  return new_state, step_metrics
