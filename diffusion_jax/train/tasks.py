"""The tasks the training loop runs, picked by the config's top-level `task` key.

A task's `build(config, model=None)` makes its experiment, a `task.Task`: the
state, the step, the batches, the periodic hooks and the resume rules the loop
needs. A new task is one module with such a `build`, plus one line here.
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from diffusion_jax.distill import consistency_task, progressive_task
from diffusion_jax.segmentation import experiment as segmentation
from diffusion_jax.train import diffusion_task
from diffusion_jax.train.task import Task

TASKS = {  # config.task -> its build(config, model)
  "diffusion": diffusion_task.build,
  "segmentation": segmentation.build,
  "progressive": progressive_task.build,
  "consistency": consistency_task.build,
}
DEFAULT_TASK = "diffusion"


def build(config: ml_collections.ConfigDict, model: nn.Module | None = None) -> Task:
  """The experiment of `config.task` (diffusion when the config has none)."""
  task = config.get("task", DEFAULT_TASK)
  if task not in TASKS:
    raise ValueError(f"Unknown config.task {task!r}; known: {sorted(TASKS)}.")
  return TASKS[task](config, model)
