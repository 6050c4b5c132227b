"""Orbax checkpoints of the train state and the data iterator, saved side by side.

Saves are atomic (Orbax writes to `<step>.orbax-checkpoint-tmp` and renames it
when complete), so a save interrupted by kill -9 or a full disk is never
restored: the steps listed skip temporary directories, and the next training
run in the workdir deletes them. A save counts as done only once storage lists
it as finished: a write that fails without Orbax raising is still reported.

Each checkpoint also holds the checksum of every array it saved (its
`integrity` item), and a state with a non-finite value is never saved. A
restore recomputes the checksums; a checkpoint that fails to restore or to
verify is reported with a warning, left in place, and the one before it is
restored instead. The keep-last-K rotation counts and deletes only finished
checkpoints with checksums that were not found damaged, so it never deletes
the newest verified one, nor anything in `checkpoints/` this code did not write.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import signal
import threading
import time

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import files
from diffusion_jax import checksums

CONFIG_FILE = "config.json"
_DATA_FILE = re.compile(r"process_\d+-of-(\d+)\.json")  # grain's file of one process's position
INTEGRITY_ITEM = "integrity"  # the checkpoint's item {"checksums": {array name: uint32}}


# What TensorStore appends to its errors: the JSON spec of the array it failed to open.
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec(\[\d+\])?='.*?'\]")


def without_tensorstore_specs(message: str) -> str:
  """`message` without the array specs (kilobytes of JSON) that TensorStore appends."""
  return _TENSORSTORE_SPEC.sub("", message)


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint restored, but an array differs from what was saved, or is not finite."""


def _agreed(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class Checkpointer:
  """Saves and restores {"state": TrainState, "data": iterator state} in `workdir/checkpoints`."""

  def __init__(
    self,
    workdir: str,
    *,
    every_steps: int,
    keep: int,
    async_saves: bool = True,
    delete_unfinished: bool = False,
  ):
    """`delete_unfinished`: delete the temporary directories of interrupted saves; only for the
    run that trains in `workdir`, as a reader would delete a live run's save in progress.
    `keep`: how many checkpoints a saving run keeps (`_delete_old_steps`)."""
    self.directory = files.join(workdir, "checkpoints")
    self.every_steps = every_steps
    self.keep = keep
    self._damaged: set[int] = set()  # steps found damaged: never restored, saved over or deleted
    self._saved_any = False  # only a Checkpointer that saved deletes old steps
    self._unconfirmed: set[int] = set()  # saves started, not yet seen finished in storage
    if delete_unfinished:
      self._delete_unfinished_saves()
    self._manager = ocp.CheckpointManager(
      files.absolute(self.directory),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=async_saves
      ),
    )

  def _step_path(self, step: int) -> epath.Path:
    return files.path(self.directory) / str(step)

  def _delete_unfinished_saves(self) -> None:
    """Deletes the temporary directories of interrupted saves (process 0 deletes, once)."""
    if jax.process_index() != 0 or not files.exists(self.directory):
      return
    for unfinished in ocp.path.step.all_temporary_paths(files.absolute(self.directory)):
      path = unfinished.get()  # local: `<step>.orbax-checkpoint-tmp*`; gs://: no commit file
      _remove_tree_of_a_settling_write(path)
      logging.info("Deleted the unfinished save %s (an interrupted or failed save).", path)

  def latest_step(self) -> int | None:
    """The newest finished checkpoint not found damaged, or None."""
    return max(self.all_steps(), default=None)

  def all_steps(self) -> list[int]:
    """The finished checkpoints not found damaged, oldest first."""
    return sorted(set(self._manager.all_steps()) - self._damaged)

  def is_due(self, step: int) -> bool:
    """Whether `step` is a multiple of every_steps: when `save` saves without `force`."""
    return step % self.every_steps == 0

  def save(
    self, step: int, state, data_iterator: grain.DatasetIterator | None, *, force=False
  ) -> bool:
    """Saves if `step` is a multiple of every_steps (or `force`); returns whether it did.

    A None iterator saves the state alone (a converted checkpoint has no data
    position; training from it starts its data from the beginning). The
    checksum of every array is saved with it. The save runs in the
    background; an earlier one that failed (a full disk) raises
    CheckpointError here or in `wait`. Once the earlier saves are finished,
    the checkpoints beyond the newest `keep` are deleted (`_delete_old_steps`).

    Raises:
      FloatingPointError: `state` holds a non-finite value (named); nothing is saved.
    """
    if not (force or self.is_due(step)) or self._is_taken(step):
      return False
    saved_checksums, non_finite = checksums.array_summaries(state)
    if non_finite:
      raise FloatingPointError(
        f"Not saving checkpoint {self._step_path(step)}: the state's {non_finite[0]} holds"
        f" non-finite values ({len(non_finite)} array(s) do); the latest checkpoint is step"
        f" {self.latest_step()}."
      )
    items = {
      "state": ocp.args.StandardSave(state),
      INTEGRITY_ITEM: ocp.args.JsonSave({"checksums": saved_checksums}),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.wait()
    self._delete_old_steps()
    self._saved_any = True
    self._unconfirmed.add(step)
    with self._naming_save_failures():
      return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _is_taken(self, step: int) -> bool:
    """Whether something is at `step`'s path: this run's checkpoint, or (with a warning) another."""
    path = self._step_path(step)
    if not path.exists():
      return False
    if step not in self.all_steps():
      what = "a damaged checkpoint" if step in self._damaged else "not a checkpoint"
      logging.warning(
        "Not saving step %d: %s is in the way (%s) and is left as it is; move it"
        " aside to save this step.",
        step,
        path,
        what,
      )
    return True

  def _delete_old_steps(self) -> None:
    """Deletes the finished checkpoints beyond the newest `keep` that hold checksums.

    Called with no save in flight, so the newest finished checkpoint is
    verified or saved by this run, and is kept. Steps found damaged, steps
    without checksums and anything else in the directory are left alone.
    """
    ours = [step for step in self.all_steps() if (self._step_path(step) / INTEGRITY_ITEM).exists()]
    for step in ours[: -self.keep]:
      self._manager.delete(step)
      logging.info(
        "Deleted checkpoint %s (train.keep_checkpoints=%d).", self._step_path(step), self.keep
      )

  @contextlib.contextmanager
  def _naming_save_failures(self):
    """Re-raises a failed save (disk full, no permission) as one error naming the directory."""
    try:
      yield
    except Exception as e:  # Orbax and TensorStore raise ValueError, OSError, ... for I/O errors.
      raise CheckpointError(
        f"Saving a checkpoint in {self.directory} failed: {type(e).__name__}: {e}. Finished"
        f" checkpoints: {self.all_steps()}; the unfinished one is never restored."
      ) from e

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """Restores the state onto the shardings of `abstract_state`, and the iterator in place.

    The state is read onto any mesh, whatever the devices that saved it, and
    checked against its saved checksums. With `step` None, a checkpoint that
    fails to restore or to verify is reported with a warning and left in
    place, and the one before it is restored. The data position is per
    process: resumed exactly by the same number of processes; with another
    number, or none saved, the iterator starts a fresh order seeded by the
    step instead, with a warning naming the missing file.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set.
      data_iterator: a `data.TrainIterator`, advanced in place to where the
        checkpoint left it; None restores the state alone (for sampling and
        evaluation).
      step: which checkpoint; None: the newest that restores and verifies.

    Returns:
      The restored state, or None when the directory holds no checkpoint.

    Raises:
      CheckpointError: `step` (or, with None, every checkpoint) is damaged.
    """

    def items(step):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None and self._data_file(step).exists():
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      return items

    found = self._restore_verified(items, step)
    if found is None:
      return None
    step, restored = found
    if data_iterator is not None and not self._data_file(step).exists():
      self._restart_data_order(step, data_iterator)
    return restored.state

  def _data_file(self, step: int) -> epath.Path:
    """Where checkpoint `step` holds this process's data position (grain's file name)."""
    return (
      self._step_path(step)
      / "data"
      / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    )

  def _restart_data_order(self, step: int, data_iterator) -> None:
    saved = " or ".join(map(str, sorted(self.data_process_counts(step)))) or "no"
    logging.warning(
      "Checkpoint %d has no data position %s (it holds that of %s process(es)): training goes"
      " on with a fresh data order seeded by step %d (the examples already seen are not taken"
      " into account).",
      step,
      self._data_file(step),
      saved,
      step,
    )
    data_iterator.restart_order(step)

  def data_process_counts(self, step: int) -> set[int]:
    """The process counts whose data positions checkpoint `step` holds (grain's file names)."""
    data_dir = self._step_path(step) / "data"
    if not data_dir.exists():
      return set()
    return {
      int(match[1]) for path in data_dir.iterdir() if (match := _DATA_FILE.fullmatch(path.name))
    }

  def restore_fields(self, abstract_fields: dict, step: int | None = None) -> dict | None:
    """Restores only the named fields of the saved state, e.g. {"ema_params": ..., "step": ...}.

    What sampling and evaluation need, without reading the optimizer state
    (Adam's moments are twice the parameters). `abstract_fields` maps field
    names of the TrainState to pytrees of jax.ShapeDtypeStruct with shardings.
    Verified and chosen as in `restore`. Returns the restored dict, or None
    when there is no checkpoint.
    """
    restore = ocp.args.PyTreeRestore(
      item=abstract_fields,
      partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_fields),
    )
    found = self._restore_verified(lambda _: {"state": restore}, step)
    return None if found is None else found[1].state

  def _restore_verified(self, make_items, step: int | None):
    """-> (step, restored items) of `step`, else of the newest checkpoint that restores and
    verifies; None when there is none. `make_items(step)`: the Orbax restore args."""
    if step is not None:
      return step, self._restore_and_verify(step, make_items(step))
    self._report_strays()
    failures = []
    for candidate in reversed(self.all_steps()):
      try:
        return candidate, self._restore_and_verify(candidate, make_items(candidate))
      except CheckpointError as error:
        self._damaged.add(candidate)
        failures.append(str(error))
        logging.warning("%s It is left in place; trying the checkpoint before it.", error)
    if failures:
      raise CheckpointError(f"No checkpoint in {self.directory} restores: {' '.join(failures)}")
    return None

  def _report_strays(self) -> None:
    """Warns of step-named paths that are not directories: never read, written or deleted."""
    if not files.exists(self.directory):  # an object store has no empty folder before a save
      return
    for path in files.path(self.directory).iterdir():
      if path.name.isdigit() and not path.is_dir():
        logging.warning("%s is a file, not a checkpoint: left as it is.", path)

  def _restore_and_verify(self, step: int, items: dict):
    """Restores `items` of `step` and checks the state against its saved checksums.

    Every process reaches the same verdict: one that fails fails all.

    Raises:
      CheckpointError: naming the checkpoint and why (DamagedCheckpointError:
        the first array that differs from what was saved, or is not finite).
    """
    has_checksums = (self._step_path(step) / INTEGRITY_ITEM).exists()
    if has_checksums:
      items = {**items, INTEGRITY_ITEM: ocp.args.JsonRestore()}
    error, restored = None, None
    try:
      restored = self._restore(step, items)
      saved = restored[INTEGRITY_ITEM]["checksums"] if has_checksums else None
      self._verify(step, restored.state, saved)
    except CheckpointError as e:
      error = e
    if not _agreed(error is None):
      raise error or CheckpointError(
        f"Checkpoint {self._step_path(step)} failed to restore on another process."
      )
    if not has_checksums:
      logging.warning(
        "Checkpoint %s holds no checksums (saved by an older version): restored unverified.",
        self._step_path(step),
      )
    logging.info("Restored checkpoint of step %d from %s.", step, self.directory)
    return restored

  def _verify(self, step: int, tree, saved: dict[str, int] | None) -> None:
    """Raises DamagedCheckpointError if an array of `tree` is not finite or not as `saved`."""
    found, non_finite = checksums.array_summaries(tree)
    damaged = [
      name for name, checksum in found.items() if saved is not None and saved.get(name) != checksum
    ]
    if damaged:
      raise DamagedCheckpointError(
        f"Checkpoint {self._step_path(step)} is damaged: array {damaged[0]} differs from what"
        f" was saved ({len(damaged)} array(s) do)."
      )
    if non_finite:
      raise DamagedCheckpointError(
        f"Checkpoint {self._step_path(step)} holds non-finite values in {non_finite[0]}"
        f" ({len(non_finite)} array(s) do)."
      )

  def _restore(self, step: int, items: dict):
    """The manager's restore of `items` at `step`; any failure names the checkpoint."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types for damaged files; name the checkpoint.
      raise CheckpointError(
        f"Cannot restore checkpoint {self._step_path(step)}:"
        f" {type(e).__name__}: {without_tensorstore_specs(str(e))}."
      ) from e

  def wait(self):
    """Blocks until every asynchronous save has been written, and checks that each finished.

    Orbax can drop a failed write without raising (seen with a full disk), so
    a save is done only once storage lists it as finished. With several
    processes this is a collective: process 0, which commits, looks; the
    others wait for its verdict, and then all list the same finished steps.

    Raises:
      CheckpointError: a save failed (named), or did not finish.
    """
    with self._naming_save_failures():
      self._manager.wait_until_finished()
    if not self._unconfirmed:
      return
    unconfirmed, self._unconfirmed = sorted(self._unconfirmed), set()
    if not _agreed(jax.process_index() != 0 or self._listed_in_storage(unconfirmed)):
      raise CheckpointError(
        f"Saving checkpoint(s) {unconfirmed} in {self.directory} did not finish, though no"
        f" error was raised (a full disk?). Finished checkpoints: {self.all_steps()}; an"
        " unfinished one is never restored."
      )

  def _listed_in_storage(self, steps: list[int]) -> bool:
    """Whether storage lists every one of `steps` as a finished checkpoint (re-read)."""
    self._manager.reload()
    return set(steps) <= set(self._manager.all_steps())

  def close(self):
    """Waits for the saves in flight, deletes the checkpoints past `keep`, closes the manager."""
    try:
      self.wait()
      if self._saved_any:
        self._delete_old_steps()
    finally:
      self._manager.close()


def _remove_tree_of_a_settling_write(
  path: epath.Path, attempts: int = 40, pause_s: float = 0.25
) -> None:
  """Deletes `path`, retrying while writes into it are still landing.

  A save that failed in this process (a full disk) leaves TensorStore writes
  in flight for a moment; a deletion that meets one fails ("Directory not
  empty"). They end on their own, so the deletion is retried for ~10 s.

  Raises:
    CheckpointError: naming `path`, when it still cannot be deleted.
  """
  for attempt in itertools.count(1):
    try:
      path.rmtree(missing_ok=True)
      return
    except OSError as e:
      if attempt == attempts:
        raise CheckpointError(
          f"Cannot delete the unfinished save {path}: {e}. Delete it by hand and start again."
        ) from e
      time.sleep(pause_s)


def restore_target(state, shardings):
  """Each leaf's shape and dtype, placed on the current mesh: what Orbax restores onto."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )


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
    raise files.PathError(
      f"Cannot write in workdir {workdir}: {e.strerror or e}. Checkpoints,"
      " config and metrics go there: pick a writable --workdir."
    ) from e


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config as JSON beside the checkpoints, atomically (process 0 only)."""
  if jax.process_index() == 0:
    files.write_text(files.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = files.join(workdir, CONFIG_FILE)
  if not files.exists(path):
    raise files.PathNotFoundError(
      f"No {CONFIG_FILE} in workdir {workdir!r}: is it a training run's?"
    )
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
        logging.warning(
          "JAX's preemption service is off (jax_enable_preemption_service):"
          " SIGTERM ends this multi-process run without a checkpoint."
        )
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
