"""What a task gives the training loop: its state, step, batches, periodic hooks and resume rules.

The loop (train/loop.py) runs any `Task`; a task module implements it and
imports this interface, never the loop. Tasks are listed in train/tasks.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import ml_collections

from diffusion_jax import summaries
from diffusion_jax.config.train import TrainConfig
from diffusion_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Hook:
  """A periodic action of the loop: `run(state, step, writer)` every `every` steps and at the last.

  `every` 0 runs it at the last step only. Each task lists its own
  (`periodic_hooks`): diffusion draws sample grids and scores them,
  segmentation measures IoU on held-out images.
  """

  name: str
  every: int
  run: Callable[[TrainState, int, summaries.LoggedWriter], None]

  def due(self, step: int, last: bool) -> bool:
    return last or bool(self.every and step % self.every == 0)


class Task(Protocol):
  """A config made concrete for the loop (the diffusion Experiment, SegmentationExperiment)."""

  config: ml_collections.ConfigDict  # the whole run's config, saved as config.json
  model: nn.Module
  train: TrainConfig  # the loop's settings (a task's own section may extend it)

  # Rows this task adds to `run_config.RESUME_RULES`: what a resumed run may change in its
  # own sections (dotted key -> FIXED_BY_CHECKPOINT, FIXED_BY_RUN or MAY_CHANGE).
  resume_rules: Mapping[str, str]

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state; the loop jits it with out_shardings to create it sharded."""

  def train_step_fn(self) -> Callable[[TrainState, Any], tuple[TrainState, Any]]:
    """The pure `(state, batch) -> (state, metrics)` the loop jits."""

  def counted_step_fn(self) -> Callable[[TrainState, Any], tuple[TrainState, Any]] | None:
    """The train step as model FLOPs count it, or None when `train_step_fn`'s own count is right.

    XLA's cost analysis counts a loop's body once (a gradient-accumulation scan
    of k microbatches: 1/k of its work) and counts rematerialised forward passes
    (work the model needs only for memory): the same update without either is
    what MFU counts (`train/loop.py`).
    """

  def make_train_iterator(self) -> Iterator[Any]:
    """The endless, checkpointable iterator of this process's training batches."""

  def periodic_hooks(self, mesh: jax.sharding.Mesh, workdir: str) -> list[Hook]:
    """The loop's periodic actions, set up now (a missing network or data set fails here)."""
