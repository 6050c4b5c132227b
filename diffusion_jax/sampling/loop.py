"""The structure every sampler shares: the steps it visits and one compiled loop over them.

A sampler is a pure `step(x, i, key, state) -> (x_next, pred_x0, state)` at
index i of a `SamplingSchedule`; `run_steps` scans it over the indices as one
`lax.scan`, drawing per-step keys and optionally recording a trajectory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, schedules
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingSchedule:
  """The K steps a sampler visits: a K-step schedule and the model's timestep of each.

  With respacing (Improved DDPM sec. 4) `schedule` is the respaced one, and
  index i is passed to the model as its training timestep `timesteps[i]`.
  """

  schedule: Schedule
  timesteps: jax.Array  # int32 [K]

  @property
  def num_steps(self) -> int:
    return self.schedule.num_timesteps


def respaced(
  schedule: Schedule, steps: int | str | Iterable[int] | None = None
) -> SamplingSchedule:
  """The steps of `schedule` a sampler visits: all T (steps=None) or a respaced subset.

  `steps` is any spec of `schedules.respace`: an int N spreads N steps evenly
  over [0, T-1] (both ends kept), "ddimN" takes DDIM's stride T // N.
  """
  if steps is None:
    return SamplingSchedule(schedule, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
  return SamplingSchedule(*schedules.respace(schedule, steps))


def logsnr_respaced(schedule: Schedule, num_steps: int) -> SamplingSchedule:
  """`num_steps` training timesteps spaced uniformly in lambda_t = log(alpha_t / sigma_t).

  DPM-Solver's fixed step schedule (Lu et al. 2022, "uniform lambda"), over
  the discrete schedule: the lambda targets, from lambda at t = T-1 to t = 0, are
  mapped to the nearest timestep; where rounding merges two of them near t = 0
  (where lambda changes fastest) the later one moves up a step, so exactly
  `num_steps` distinct timesteps are kept (all T for num_steps = T).
  """
  num_timesteps = schedule.num_timesteps
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"Cannot space {num_steps} steps by log-SNR over {num_timesteps}.")
  alphas_cumprod = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
  lam = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # decreasing in t
  targets = np.linspace(lam[0], lam[-1], num_steps)
  steps = np.round(np.interp(-targets, -lam, np.arange(num_timesteps)))
  offsets = np.arange(num_steps)
  # Strictly increasing, within [0, T-1]: no two targets on one timestep.
  steps = np.maximum.accumulate(steps - offsets) + offsets
  steps = np.minimum(steps, num_timesteps - num_steps + offsets)
  return respaced(schedule, steps.astype(int).tolist())


def as_sampling_schedule(schedule: Schedule | SamplingSchedule) -> SamplingSchedule:
  """A plain `Schedule` means all of its steps."""
  return schedule if isinstance(schedule, SamplingSchedule) else respaced(schedule)


def noise_levels(schedule: Schedule) -> tuple[jax.Array, jax.Array]:
  """(alpha, sigma) [K+1] of x = alpha x_0 + sigma eps on the sampler's grid.

  Grid point 0 is clean data (alpha = 1, sigma = 0); grid point i + 1 is step i.
  The square roots come from the float64-derived schedule fields, so sigma stays
  accurate where alpha_bar is close to 1.
  """
  alpha = jnp.concatenate([jnp.ones((1,)), schedule.sqrt_alphas_cumprod])
  sigma = jnp.concatenate([jnp.zeros((1,)), schedule.sqrt_one_minus_alphas_cumprod])
  return alpha, sigma


def predict_x0(
  model_fn: ModelFn, spec: ModelSpec, steps: SamplingSchedule, x: jax.Array, i: jax.Array
) -> jax.Array:
  """The model's x_0 estimate [B, ...] at step index i, clipped to [-1, 1] if spec.clip_x0."""
  t = jnp.full(x.shape[:1], i, jnp.int32)
  mean_output, _ = diffusion.split_output(spec, model_fn(x, steps.timesteps[t]))
  x0 = diffusion.predict_x0(spec, steps.schedule, mean_output, x, t)
  return jnp.clip(x0, -1.0, 1.0) if spec.clip_x0 else x0


def initial_noise(key: jax.Array, shape, x_T: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(x_T, key for the steps): x_T ~ N(0, I) of the full `shape` unless given.

  The noise is drawn for the whole global shape from one key, so with the
  partitionable threefry PRNG it is the same however the batch is sharded.
  """
  noise_key, steps_key = jax.random.split(key)
  if x_T is None:
    return jax.random.normal(noise_key, shape, jnp.float32), steps_key
  if tuple(x_T.shape) != tuple(shape):
    raise ValueError(f"x_T has shape {x_T.shape}, expected {tuple(shape)}.")
  return jnp.asarray(x_T), steps_key


class Trajectory(NamedTuple):
  """Every k-th state of a sampler: N = ceil(num_steps / k) records."""

  x_t: jax.Array  # [N, B, H, W, C] the state before the step
  pred_x0: jax.Array  # [N, B, H, W, C] the x_0 predicted at that step
  timesteps: jax.Array  # int32 [N] the model's timestep of that step


def run_steps(
  step: Callable,
  x: jax.Array,
  indices: jax.Array,
  key: jax.Array | None,
  steps: SamplingSchedule,
  *,
  state=(),
  trajectory_every: int = 0,
):
  """Scans `step(x, i, key_i, state) -> (x, pred_x0, state)` over `indices` [n].

  key_i = fold_in(key, i) (None when key is None), so a step's noise depends
  only on its index, not on which other steps run. `steps` gives the recorded
  timesteps; a sampler over continuous sigma (EDM's) passes None and records none.

  Returns:
    the final x, or (x, Trajectory) when trajectory_every > 0.
  """
  if trajectory_every < 0:
    raise ValueError(f"trajectory_every must be >= 0, got {trajectory_every}.")
  num_records = math.ceil(indices.shape[0] / trajectory_every) if trajectory_every else 0
  empty = jnp.zeros((num_records,) + x.shape, x.dtype)
  trajectory = Trajectory(empty, empty, jnp.zeros((num_records,), jnp.int32))

  def body(carry, j_and_i):
    x, state, trajectory = carry
    j, i = j_and_i
    step_key = None if key is None else jax.random.fold_in(key, i)
    x_next, pred_x0, state = step(x, i, step_key, state)
    if trajectory_every:
      trajectory = _record(trajectory, j, trajectory_every, (x, pred_x0, steps.timesteps[i]))
    return (x_next, state, trajectory), None

  positions = jnp.arange(indices.shape[0], dtype=jnp.int32)
  (x, _, trajectory), _ = jax.lax.scan(body, (x, state, trajectory), (positions, indices))
  return (x, trajectory) if trajectory_every else x


def _record(trajectory: Trajectory, j, every: int, values) -> Trajectory:
  """Writes `values` into record j // every when j is a multiple of `every`."""
  slot, keep = j // every, j % every == 0
  return Trajectory(
    *(
      buffer.at[slot].set(jnp.where(keep, value, buffer[slot]))
      for buffer, value in zip(trajectory, values)
    )
  )
