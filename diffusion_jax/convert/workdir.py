"""A converted checkpoint as a run's workdir, and as an EmaModel in memory.

The workdir is what a training run leaves: config.json and an Orbax
checkpoint of a full TrainState whose params and ema_params are the converted
parameters (a fresh optimizer state, the step of the source), so that
launch.sample, launch.evaluate and runs.py read it as one of ours.
convert.json beside them names the source file, its SHA-256 and its flags.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import checkpoint, files, outputs, parallel, runs, weightfiles
from diffusion_jax.convert.converted import Converted
from diffusion_jax.train import tasks

RECORD_FILE = "convert.json"


def write_workdir(converted: Converted, workdir: str) -> dict:
  """Writes `converted` as a run in a new `workdir`; returns what convert.json records.

  config.json is written only once the checkpoint is complete, convert.json
  last; an interrupted conversion leaves a workdir that this refuses.

  Raises:
    FileExistsError: `workdir` already holds a config.json, checkpoints or a convert.json.
    outputs.OutputConflictError: `workdir` is, lies inside or contains the source.
  """
  outputs.check_apart(workdir, [converted.source["path"]], what="workdir")
  present = [
    name
    for name in (checkpoint.CONFIG_FILE, "checkpoints", RECORD_FILE)
    if files.exists(files.join(workdir, name))
  ]
  if present:
    raise FileExistsError(
      f"{workdir} already holds a run ({', '.join(present)}): pick a new"
      " workdir for the converted checkpoint"
    )
  config = converted.config()
  params = jax.tree.map(jnp.asarray, converted.params)
  exp, rng = tasks.build(config), jax.random.PRNGKey(config.seed)
  _check_same_structure(params, jax.eval_shape(exp.init_state, rng).params)
  # A fresh optimizer state: Adam's moments are zeros whatever the parameters' values.
  state = exp.init_state(rng, params).replace(step=jnp.array(converted.step, jnp.int32))
  checkpointer = checkpoint.Checkpointer(workdir, every_steps=1, keep=1, async_saves=False)
  checkpointer.save(converted.step, state, None, force=True)
  checkpointer.wait()
  checkpointer.close()
  checkpoint.save_config(config, workdir)
  record = {
    **converted.source,
    "sha256": weightfiles.sha256(converted.source["path"]),
    "step": converted.step,
    "image_shape": list(converted.image_shape),
  }
  files.write_json(files.join(workdir, RECORD_FILE), record, indent=2, default=str)
  return record


def _check_same_structure(converted, fresh) -> None:
  """Raises a ValueError naming the first parameter whose path or shape the config's model lacks."""
  shapes = lambda tree: {
    jax.tree_util.keystr(path): np.shape(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }
  got, want = shapes(converted), shapes(fresh)
  if got != want:
    name = next(k for k in sorted(got.keys() | want.keys()) if got.get(k) != want.get(k))
    raise ValueError(
      f"The converted parameter {name} has shape {got.get(name)}, the model of its"
      f" config {want.get(name)}: the conversion and the config disagree."
    )


def ema_model(converted: Converted) -> runs.EmaModel:
  """The EmaModel that runs.load_ema_for_sampling would give for write_workdir's run."""
  params = jax.device_put(converted.params, parallel.replicated(parallel.make_mesh()))
  return runs.ema_model(converted.config(), params, converted.step)
