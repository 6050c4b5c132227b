"""Orbax checkpoints of the train state and the data iterator, saved side by side.

Saves are atomic (Orbax writes to `<step>.orbax-checkpoint-tmp` and renames it
when complete), so a save interrupted by kill -9 or a full disk is never
restored: the steps listed skip temporary directories, and the next training
run in the workdir deletes them. A finished checkpoint is never deleted here except by the
keep-last-K policy.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import files

CONFIG_FILE = "config.json"
_DATA_FILE = re.compile(r"process_\d+-of-(\d+)\.json")  # grain's file of one process's position


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored."""


class Checkpointer:
  """Saves and restores {"state": TrainState, "data": iterator state} in `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int, async_saves: bool = True,
               delete_unfinished: bool = False):
    """`delete_unfinished`: delete the temporary directories of interrupted saves; only for the
    run that trains in `workdir`, as a reader would delete a live run's save in progress."""
    self.directory = files.join(workdir, "checkpoints")
    self.every_steps = every_steps
    self._manager = ocp.CheckpointManager(
        files.absolute(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_saves,
            cleanup_tmp_directories=delete_unfinished))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def is_due(self, step: int) -> bool:
    """Whether `step` is a multiple of every_steps: when `save` saves without `force`."""
    return step % self.every_steps == 0

  def save(self, step: int, state, data_iterator: grain.DatasetIterator | None, *,
           force=False) -> bool:
    """Saves if `step` is a multiple of every_steps (or `force`); returns whether it did.

    A None iterator saves the state alone (a converted checkpoint has no data
    position; training from it starts its data from the beginning). The save
    runs in the background; an earlier one that failed (a full disk) raises
    CheckpointError here or in `wait`.
    """
    if not (force or self.is_due(step)) or step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    with self._naming_save_failures():
      return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  @contextlib.contextmanager
  def _naming_save_failures(self):
    """Re-raises a failed save (disk full, no permission) as one error naming the directory."""
    try:
      yield
    except Exception as e:  # Orbax and TensorStore raise ValueError, OSError, ... for I/O errors.
      raise CheckpointError(
          f"Saving a checkpoint in {self.directory} failed: {type(e).__name__}: {e}. Finished"
          f" checkpoints: {self.all_steps()}; the unfinished one is never restored.") from e

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """Restores the state onto the shardings of `abstract_state`, and the iterator in place.

    The state is read onto any mesh, whatever the devices that saved it. The
    data position is per process: resumed exactly by the same number of
    processes; with another number, the iterator starts a fresh order seeded
    by the step instead, with a warning.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set.
      data_iterator: a `data.TrainIterator`, advanced in place to where the
        checkpoint left it (left as it is when the checkpoint saved none);
        None restores the state alone (for sampling and evaluation).
      step: which checkpoint; the latest when None.

    Returns:
      The restored state, or None when the directory holds no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    saved_counts = self.data_process_counts(step) if data_iterator is not None else set()
    if jax.process_count() in saved_counts:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    state = self._restore(step, items).state
    if saved_counts and jax.process_count() not in saved_counts:
      logging.warning(
          "Checkpoint %d holds the data position of %s process(es) and this run has %d: that"
          " position cannot be resumed, so training goes on with a fresh data order seeded by"
          " step %d (the examples already seen are not taken into account).", step,
          " or ".join(map(str, sorted(saved_counts))), jax.process_count(), step)
      data_iterator.restart_order(step)
    return state

  def data_process_counts(self, step: int) -> set[int]:
    """The process counts whose data positions checkpoint `step` holds (grain's file names)."""
    data_dir = files.path(self.directory) / str(step) / "data"
    if not data_dir.exists():
      return set()
    return {int(match[1]) for path in data_dir.iterdir()
            if (match := _DATA_FILE.fullmatch(path.name))}

  def restore_fields(self, abstract_fields: dict, step: int | None = None) -> dict | None:
    """Restores only the named fields of the saved state, e.g. {"ema_params": ..., "step": ...}.

    What sampling and evaluation need, without reading the optimizer state
    (Adam's moments are twice the parameters). `abstract_fields` maps field
    names of the TrainState to pytrees of jax.ShapeDtypeStruct with shardings.
    Returns the restored dict, or None when there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restore = ocp.args.PyTreeRestore(
        item=abstract_fields, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_fields))
    return self._restore(step, {"state": restore}).state

  def _restore(self, step: int, items: dict):
    """The manager's restore of `items` at `step`; any failure names the checkpoint."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types for damaged files; name the checkpoint.
      others = [s for s in self.all_steps() if s != step]
      raise CheckpointError(
          f"Cannot restore checkpoint {files.join(self.directory, str(step))}:"
          f" {type(e).__name__}: {e}. Other checkpoints here: {others}. Move the damaged one"
          " aside to resume from an earlier one; nothing was deleted.") from e
    logging.info("Restored checkpoint of step %d from %s.", step, self.directory)
    return restored

  def wait(self):
    """Blocks until every asynchronous save has been written."""
    with self._naming_save_failures():
      self._manager.wait_until_finished()

  def close(self):
    """Waits for the saves in flight, then closes the manager."""
    try:
      self.wait()
    finally:
      self._manager.close()


def restore_target(state, shardings):
  """Each leaf's shape and dtype, placed on the current mesh: what Orbax restores onto."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def check_writable(workdir: str) -> None:
  """Creates `workdir` and writes a file in it, so that a read-only one fails before training.

  Every process checks, as every process writes its data position.

  Raises:
    OSError: naming the workdir and the reason.
  """
  probe = files.join(workdir, f".write_check_{jax.process_index()}")
  try:
    files.write_text(probe, "")
    files.remove(probe)
  except OSError as e:
    raise files.PathError(f"Cannot write in workdir {workdir}: {e.strerror or e}. Checkpoints,"
                          " config and metrics go there: pick a writable --workdir.") from e


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config as JSON beside the checkpoints, atomically (process 0 only)."""
  if jax.process_index() == 0:
    files.write_text(files.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = files.join(workdir, CONFIG_FILE)
  if not files.exists(path):
    raise files.PathNotFoundError(f"No {CONFIG_FILE} in workdir {workdir!r}: is it a training"
                                  " run's?")
  return ml_collections.ConfigDict(files.read_json(path))


class PreemptionNotice:
  """Whether to save and stop after a step because SIGTERM came, every process at the same step.

  One process: a SIGTERM handler sets a flag, read between steps. Several
  processes (`jax.distributed.initialize()` called): JAX's preemption sync
  manager, whose SIGTERM handler `initialize` installed. When any process gets
  SIGTERM (a pod preempted: all of them; a node drained: one), the coordination
  service tells every process; in a background thread each sends the last step
  it reported, and all stop at the one after the furthest. No Python handler
  is installed then: it would replace JAX's, and the notice would never spread.
  Neither path costs a device sync.

  Call `reached(step)` after every step, on every process. Steps are the
  global step numbers, as Orbax's CheckpointManager also reports them to JAX.
  """

  def __init__(self, first_step: int):
    """`first_step`: the step the run starts from (0, or the restored checkpoint's)."""
    self._first_step = first_step
    self._event = threading.Event()
    self._previous = None
    self._jax_sync = jax.distributed.is_initialized()

  def __enter__(self):
    if self._jax_sync:
      try:  # JAX agrees on step 1 for a notice before this call: see docs/training.md.
        multihost_utils.reached_preemption_sync_point(self._first_step)
      except RuntimeError:
        logging.warning("JAX's preemption service is off (jax_enable_preemption_service):"
                        " SIGTERM ends this multi-process run without a checkpoint.")
        self._jax_sync = False
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    """Whether `step`, just taken, is the one to save and stop at."""
    if self._jax_sync:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()
