"""The `optim` section: the optimizer, its learning-rate schedule and clipping (train/optimizer.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from diffusion_jax import configlib
from diffusion_jax.configlib import from_mapping

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd")
RANGES = {  # OptimConfig's numeric fields and the values each accepts
  "lr": configlib.POSITIVE,
  "warmup_steps": configlib.NON_NEGATIVE,
  "decay_steps": configlib.NON_NEGATIVE,
  "b1": configlib.DECAY,
  "b2": configlib.DECAY,
  "eps": configlib.NON_NEGATIVE,
  "weight_decay": configlib.NON_NEGATIVE,
  "momentum": configlib.DECAY,
  "grad_clip": configlib.NON_NEGATIVE,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  """Optimizer settings; Ho et al. 2020 trained with Adam, lr 2e-4, 5000 warmup steps, clip 1."""

  optimizer: str = "adam"
  lr: float = 2e-4  # peak learning rate
  warmup_steps: int = 5000  # linear warmup from 0 to `lr`
  schedule: str = "constant"  # after warmup: constant, or cosine / linear decay to 0
  decay_steps: int = 0  # length of the decay after warmup (0: none)
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0  # decoupled, for "adamw"
  momentum: float = 0.9  # for "sgd" (Ronneberger et al. 2015 use 0.99)
  grad_clip: float = 1.0  # global-norm clipping; 0 turns it off

  def __post_init__(self):
    configlib.check_ranges(self, "optim", RANGES)
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"Unknown optim.optimizer {self.optimizer!r}; known: {OPTIMIZERS}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"Unknown optim.schedule {self.schedule!r}; known: {SCHEDULES}.")
    if self.schedule != "constant" and self.decay_steps <= 0:
      raise ValueError(f"optim.schedule {self.schedule!r} needs optim.decay_steps > 0.")

  @classmethod
  def from_mapping(cls, mapping: Any) -> "OptimConfig":
    return from_mapping(cls, mapping, "optim")
