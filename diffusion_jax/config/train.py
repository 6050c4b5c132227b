"""The `train` section every task shares: the loop's length, batch, logging, checkpoints, layout."""

from __future__ import annotations

import dataclasses

from diffusion_jax import configlib

NONFINITE_ACTIONS = ("stop", "skip")  # train.on_nonfinite

TRAIN_RANGES = {  # TrainConfig's numeric fields and the values each accepts
  **dict.fromkeys(
    (
      "batch_size",
      "num_steps",
      "log_every",
      "checkpoint_every",
      "keep_checkpoints",
      "model_parallelism",
      "grad_accum_steps",
    ),
    configlib.AT_LEAST_ONE,
  ),
  "eval_every": configlib.NON_NEGATIVE,
  "ema_decay": configlib.DECAY,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """The loop: how long, how big, how often to log, evaluate and checkpoint; any task's."""

  batch_size: int = 128  # global, over all devices and hosts
  num_steps: int = 800_000
  ema_decay: float = 0.9999
  log_every: int = 100  # steps between metric writes (the only host syncs)
  checkpoint_every: int = 10_000
  keep_checkpoints: int = 3
  model_parallelism: int = 1  # size of the mesh's "model" axis (FSDP); 1 = data parallel
  eval_every: int = 0  # steps between the task's evaluations of the EMA parameters; 0 = none
  grad_accum_steps: int = 1  # microbatches per optimizer step (batch_size / k images each)
  # A step with a non-finite loss or gradient never changes the state (train/state.py); "stop":
  # the run then raises naming that step, with no checkpoint saved after it; "skip": it goes on,
  # counting such steps in the metric skipped_steps. See docs/training.md.
  on_nonfinite: str = "stop"
  # "a,b": a jax.profiler trace of steps a to b (or "a": of step a) into WORKDIR/profile/, for
  # TensorBoard's profile plugin or Perfetto (docs/training.md); "": none.
  profile_steps: str = ""

  def __post_init__(self):
    configlib.check_ranges(self, "train", TRAIN_RANGES)
    if self.batch_size % self.grad_accum_steps:
      raise ValueError(
        f"train.grad_accum_steps={self.grad_accum_steps} does not divide"
        f" train.batch_size={self.batch_size}."
      )
    parse_profile_steps(self.profile_steps)
    if self.on_nonfinite not in NONFINITE_ACTIONS:
      raise ValueError(
        f"Unknown train.on_nonfinite {self.on_nonfinite!r}; known: {list(NONFINITE_ACTIONS)}."
      )

  @property
  def profile_range(self) -> tuple[int, int] | None:
    """(first, last) step of train.profile_steps; None: no trace."""
    return parse_profile_steps(self.profile_steps)


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """ "a,b" -> (a, b), "a" -> (a, a), "" -> None; a ValueError names train.profile_steps."""
  if not text:
    return None
  try:
    steps = [int(part) for part in text.split(",")]
  except ValueError:
    steps = []
  if len(steps) not in (1, 2) or not 1 <= steps[0] <= steps[-1]:
    raise ValueError(
      f"train.profile_steps={text!r} must be 'a,b' (steps 1 <= a <= b) or 'a', or '' for no trace."
    )
  return steps[0], steps[-1]
