"""The segmentation loss (Ronneberger et al. 2015, Sec. 3 eq. 1) and the pure train step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from clu import metrics

from diffusion_jax.train.state import TrainMetrics, TrainState, apply_gradients, masked_average


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """The mean over pixels of w(x) * -log p_l(x)(x): eq. 1 with a pixel-wise softmax.

  Args:
    logits: [B, H, W, K], the network's final feature map.
    labels: int [B, H, W], the true class l(x) of each pixel.
    weights: [B, H, W], the weight map w(x) (`weights.weight_map`).
  """
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), labels
  )
  return jnp.mean(weights * cross_entropy)


@dataclasses.dataclass(frozen=True)
class SegmentationStepFns:
  """The static parts of a segmentation train step."""

  apply: Callable[..., jax.Array]  # (params, images [B, T, T, C]) -> logits [B, O, O, K]
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  ema_decay: float
  keep_last_finite: bool = True  # train.on_nonfinite == "skip" (train.state.keep_finite_update)


def train_step(
  state: TrainState, batch: dict[str, jax.Array], fns: SegmentationStepFns
) -> tuple[TrainState, TrainMetrics]:
  """One optimizer step on {"image": [B, T, T, C], "mask": int [B, O, O], "weights": [B, O, O]}.

  Pure, with no host sync. Metrics: the weighted loss, the plain cross-entropy,
  the batch's pixel accuracy, the gradient norm, the learning rate and
  skipped_steps (a non-finite loss or gradient leaves the state as it was, and
  the step out of the means). The update is the diffusion step's
  (`train.state.apply_gradients`).
  """

  def loss_fn(params):
    logits = fns.apply(params, batch["image"])
    return weighted_cross_entropy(logits, batch["mask"], batch["weights"]), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, skipped, grad_norm = apply_gradients(
    state, grads, jnp.isfinite(loss), fns.tx, fns.ema_decay, keep_last_finite=fns.keep_last_finite
  )
  finite = skipped.count == 0
  correct = (jnp.argmax(logits, -1) == batch["mask"]).astype(jnp.float32)
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["mask"])
  return new_state, dict(
    loss=masked_average(loss[None], finite),
    cross_entropy=masked_average(cross_entropy, finite),
    pixel_accuracy=masked_average(correct, finite),
    grad_norm=masked_average(grad_norm[None], finite),
    learning_rate=metrics.LastValue(total=fns.lr_schedule(state.step), count=jnp.array(1)),
    skipped_steps=skipped,
  )
