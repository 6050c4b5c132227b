"""What every task's train step shares: the train state, the update, the finiteness guard, metrics.

A task's step computes its loss and gradient, then ends with `apply_gradients`
(optax, the EMA, and `keep_finite_update`); its metrics are clu metrics whose
means leave out skipped steps (`masked_average`). The loop merges and logs
them (`merge_metrics`, `compute_metrics`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics


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
# learning_rate, loss_q<i> (the loss in the i-th quarter of [0, T)) and skipped_steps. The
# means leave out skipped steps.
TrainMetrics = dict[str, metrics.Metric]

NO_STEP = jnp.iinfo(jnp.int32).max  # SkippedSteps.first when no step was skipped


@flax.struct.dataclass
class SkippedSteps(metrics.Metric):
  """Steps skipped for a non-finite loss, gradient or update (`keep_finite_update`): count, first.

  compute() gives the count; `first` is the first skipped step's number (the
  step the update would have made, as the loop counts them), NO_STEP if none.
  """

  count: jax.Array  # int32 []
  first: jax.Array  # int32 []

  def merge(self, other: SkippedSteps) -> SkippedSteps:
    return SkippedSteps(count=self.count + other.count, first=jnp.minimum(self.first, other.first))

  def compute(self) -> jax.Array:
    return self.count


def _all_finite(tree) -> jax.Array:
  """bool []: whether every floating-point value in `tree` is finite.

  x * 0 is 0 for a finite x and NaN for an infinite or NaN one, so the sum of
  every leaf's sum of x * 0 is 0 exactly when all are finite, and no sum can
  overflow. The sqrt that closes the chain of per-leaf sums is an identity
  here (sqrt(0) = 0, sqrt(NaN) = NaN) that XLA never duplicates: without it
  fusion copies the whole scalar chain, one add per leaf, into each of the
  per-leaf selects that read the result, and the digits train step compiled
  ten times slower on CPU (110 s instead of 12 s).
  """
  sums = [jnp.sum(x * 0) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.sqrt(sum(sums, jnp.float32(0))) == 0


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leaf by leaf, `on_true`'s value where bool [] `pred` holds, else `on_false`'s."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def keep_finite_update(
  state: TrainState, updated: TrainState, finite: jax.Array, keep_last_finite: bool = True
) -> tuple[TrainState, SkippedSteps]:
  """The step's new state and its skipped_steps metric; the counter advances either way.

  A step is finite when `finite` (the task's check of its loss and gradient)
  holds and the updated parameters and EMA are finite too, so that a NaN or
  infinite learning rate, or an update that overflows, counts as well.
  `skipped.count == 0` is the step's finiteness, for the task's means.

  `keep_last_finite` (train.on_nonfinite="skip"): a non-finite step returns
  `state` unchanged, by a select per value on the device; not a `lax.cond`,
  whose branches over sharded operands hold collectives that XLA's CPU runtime
  ran on only some devices (a deadlock of the 8-device gradient-accumulation
  step). On XLA:CPU the selects are not fused into the optimizer's passes:
  the compiled update of ddpm_cifar10 moves 34 float32 words per parameter
  with them, 22 with the check alone, 18 with neither (XLA's bytes accessed).

  Without it (train.on_nonfinite="stop") the step returns `updated` whatever
  it holds, and only counts it: the loop stops at its next look at the count,
  which comes before any save or periodic hook, so no state past a non-finite
  step is ever saved or sampled.
  """
  finite = finite & _all_finite((updated.params, updated.ema_params))
  if keep_last_finite:
    updated = select_tree(finite, updated, state)
  skipped = SkippedSteps(
    count=jnp.where(finite, 0, 1).astype(jnp.int32),
    first=jnp.where(finite, NO_STEP, state.step + 1).astype(jnp.int32),
  )
  return updated.replace(step=state.step + 1), skipped


def merge_metrics(accumulated: TrainMetrics | None, new: TrainMetrics) -> TrainMetrics:
  """Merges one step's metrics into the running ones (device arrays only: no sync)."""
  if accumulated is None:
    return new
  return {name: accumulated[name].merge(metric) for name, metric in new.items()}


def compute_metrics(accumulated: TrainMetrics) -> dict[str, float]:
  """The logged values; fetches them from the device."""
  return jax.device_get({name: metric.compute() for name, metric in accumulated.items()})


def masked_average(values: jax.Array, mask: jax.Array) -> metrics.Average:
  """The mean of `values` where boolean `mask` (broadcast) holds; NaNs elsewhere drop out.

  Each task's step masks its means with its finiteness (`skipped.count == 0`),
  so one skipped step leaves the window's other steps in the logged means.
  """
  mask = jnp.broadcast_to(mask, values.shape)
  return metrics.Average(total=jnp.sum(jnp.where(mask, values, 0.0)), count=jnp.sum(mask))


def apply_gradients(
  state: TrainState,
  grads: Any,
  loss_finite: jax.Array,
  tx: optax.GradientTransformation,
  ema_decay: float,
  *,
  keep_last_finite: bool,
  **updated: Any,
) -> tuple[TrainState, SkippedSteps, jax.Array]:
  """The update every task's step ends with: optax, the EMA, and `keep_finite_update`.

  `loss_finite` (bool []) is the task's check of its loss; the gradient's norm
  is checked here. `keep_last_finite` is train.on_nonfinite == "skip". `updated`
  holds other fields of the state the step changes (the timestep sampler's
  state). Returns (the new state, the step's skipped_steps metric, the
  gradient's global norm []).
  """
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
  new_state, skipped = keep_finite_update(
    state,
    state.replace(params=params, ema_params=ema_params, opt_state=opt_state, **updated),
    jnp.isfinite(grad_norm) & loss_finite,
    keep_last_finite,
  )
  return new_state, skipped, grad_norm
