"""The tasks the training loop runs, picked by the config's top-level `task` key.

An experiment of any task gives the loop what it needs: `train` (TrainConfig),
`model`, `init_state(rng)`, `train_step_fn()` (the pure step to jit),
`make_train_iterator()` and `periodic_hooks(mesh, workdir)`.
"""

from __future__ import annotations

import importlib

import flax.linen as nn
import ml_collections

# task -> the module whose build(config, model) makes its experiment. Imported when used:
# segmentation builds on the loop, which imports this registry.
TASKS = {
    "diffusion": "diffusion_jax.train.experiment",
    "segmentation": "diffusion_jax.segmentation.experiment",
}
DEFAULT_TASK = "diffusion"


def build(config: ml_collections.ConfigDict, model: nn.Module | None = None):
  """The experiment of `config.task` (diffusion when the config has none)."""
  task = config.get("task", DEFAULT_TASK)
  if task not in TASKS:
    raise ValueError(f"Unknown config.task {task!r}; known: {sorted(TASKS)}.")
  return importlib.import_module(TASKS[task]).build(config, model)
