"""Finished runs, for tests: their saved TrainStates, and copies of them to continue."""

from __future__ import annotations

import pathlib
import shutil

import jax

from diffusion_jax import checkpoint, parallel
from diffusion_jax.train import loop, tasks


def saved_states(workdir, config, steps=(None,)) -> list:
  """The full TrainStates (params, EMA, Adam, rng, step) a run of `config` saved in `workdir`
  at `steps` (None: the latest), as numpy arrays."""
  exp = tasks.build(config)
  mesh = parallel.make_mesh()
  state, shardings = loop.create_state(exp, mesh, config.seed)
  checkpointer = checkpoint.Checkpointer(str(workdir), every_steps=1, keep=100)
  target = checkpoint.restore_target(state, shardings)
  restored = [jax.device_get(checkpointer.restore(target, step=step)) for step in steps]
  checkpointer.close()
  return restored


def copy_run(workdir, destination, keep_steps=None) -> pathlib.Path:
  """A copy of the run in `workdir` at `destination`, with only the checkpoints of `keep_steps`
  (all when None): a run to continue, corrupt or stop without training it again."""
  destination = pathlib.Path(shutil.copytree(workdir, destination))
  if keep_steps is not None:
    for step_dir in (destination / "checkpoints").iterdir():
      if step_dir.name.isdigit() and int(step_dir.name) not in keep_steps:
        shutil.rmtree(step_dir)
  return destination
