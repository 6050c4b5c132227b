"""Checkpoints detect damage, never hold non-finite values, and never lose the last good one."""

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import digits
from diffusion_jax import checkpoint, checksums, parallel
from diffusion_jax.data import pipeline
from diffusion_jax.train import loop

import saved_runs  # tests/saved_runs.py


def _config(num_steps: int):
  """digits:smoke, a checkpoint every 2 steps, the newest 2 kept."""
  config = digits.get_config("smoke")
  config.train.update(num_steps=num_steps, checkpoint_every=2, keep_checkpoints=2)
  return config


@pytest.fixture
def workdir(digits_smoke_run, tmp_path) -> str:
  """A copy of the shared digits:smoke run (checkpoints 2 and 4)."""
  return str(saved_runs.copy_run(digits_smoke_run, tmp_path / "run"))


def _entries(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _digest(path) -> str:
  """SHA-256 of a file, or of every file under a directory."""
  paths = (
    [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    if os.path.isdir(path)
    else [path]
  )
  digest = hashlib.sha256()
  for file in sorted(paths):
    with open(file, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()


_ZSTD_MAGIC = bytes.fromhex("28b52ffd")  # the start of a zstd frame: an array chunk or a node
_OCDBT_NODE = bytes.fromhex("0cdb20de")  # OCDBT's header of a B-tree node (14 bytes)


def _frame_end(content: bytes, start: int) -> int | None:
  """Where the zstd frame at `start` ends (RFC 8878 3.1.1), or None if what is there does not
  parse as one (a chance match of the magic number)."""
  descriptor = content[start + 4]
  size_flag, single_segment, dictionary_flag = descriptor >> 6, descriptor >> 5 & 1, descriptor & 3
  if descriptor & 0b00011000:  # reserved bits
    return None
  content_size_bytes = (int(single_segment), 2, 4, 8)[size_flag]
  offset = start + 5 + (not single_segment) + (0, 1, 2, 4)[dictionary_flag] + content_size_bytes
  last = False
  while not last and offset + 3 <= len(content):
    header = int.from_bytes(content[offset : offset + 3], "little")
    last, kind, length = header & 1, header >> 1 & 3, header >> 3
    offset += 3 + (1 if kind == 1 else length)
  offset += 4 * (descriptor >> 2 & 1)  # the content checksum
  return offset if last and kind != 3 and offset <= len(content) else None


def _flip_one_byte(step_dir) -> None:
  """Flips one bit in the middle of the largest array chunk (a zstd frame) of the checkpoint.

  The middle of a chunk, not of a data file: an 8-device save's largest data
  file ends in 250 KB of B-tree nodes that no array read takes bytes from
  (measured: of 24 flips spread over it, the 5 there went unnoticed, the 19
  in chunks were all found), and a flip in a node is a failed restore, not
  an array that differs from its checksum.
  """
  paths = [
    os.path.join(root, name)
    for root, _, names in os.walk(os.path.join(step_dir, "state"))
    for name in names
    if os.path.basename(root) == "d"
  ]
  frames = []  # (length, path, start)
  for path in paths:
    with open(path, "rb") as f:
      content = f.read()
    for match in re.finditer(re.escape(_ZSTD_MAGIC), content):
      node = content[max(match.start() - 14, 0) : match.start()].startswith(_OCDBT_NODE)
      if not node and (end := _frame_end(content, match.start())):
        frames.append((end - match.start(), path, match.start()))
  length, path, start = max(frames)
  with open(path, "r+b") as f:
    f.seek(start + length // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


def _warnings(caplog) -> str:
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_a_flipped_byte_falls_back_to_the_step_before_which_rotation_keeps(workdir, caplog):
  step_4 = os.path.join(workdir, "checkpoints", "4")
  _flip_one_byte(step_4)
  damaged = _digest(step_4)
  with caplog.at_level(logging.INFO):
    state = loop.train_and_evaluate(_config(8), workdir)
  assert int(state.step) == 8
  warnings = _warnings(caplog)
  assert f"Checkpoint {step_4} is damaged: array " in warnings
  assert "Restored checkpoint of step 2 " in caplog.text
  assert f"Not saving step 4: {step_4} is in the way (a damaged checkpoint)" in warnings
  # Resumed from 2: saved 6 and 8, then kept the newest 2 verified ones; 4 is as it was.
  assert _entries(workdir) == ["4", "6", "8"] and _digest(step_4) == damaged


def test_a_file_and_an_unrestorable_step_are_reported_and_left_in_place(workdir, caplog):
  checkpoints = os.path.join(workdir, "checkpoints")
  with open(os.path.join(checkpoints, "6"), "w") as f:
    f.write("not a checkpoint")
  os.makedirs(os.path.join(checkpoints, "8", "state"))
  with open(os.path.join(checkpoints, "8", "state", "notes.txt"), "w") as f:
    f.write("someone else's")
  foreign = {step: _digest(os.path.join(checkpoints, step)) for step in ("6", "8")}
  with caplog.at_level(logging.INFO):
    loop.train_and_evaluate(_config(10), workdir)
  warnings = _warnings(caplog)
  assert f"{checkpoints}/6 is a file, not a checkpoint: left as it is." in warnings
  assert f"Cannot restore checkpoint {checkpoints}/8: " in warnings
  assert "Restored checkpoint of step 4 " in caplog.text
  for step, what in (("6", "not a checkpoint"), ("8", "a damaged checkpoint")):
    assert f"Not saving step {step}: {checkpoints}/{step} is in the way ({what})" in warnings
  assert _entries(workdir) == ["10", "4", "6", "8"]
  assert {step: _digest(os.path.join(checkpoints, step)) for step in foreign} == foreign


def test_when_no_checkpoint_restores_the_run_stops_and_deletes_nothing(workdir):
  for step in ("2", "4"):
    _flip_one_byte(os.path.join(workdir, "checkpoints", step))
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"No checkpoint in .*checkpoints restores: .*/4 is damaged.*/2 is dam",
  ):
    loop.train_and_evaluate(_config(6), workdir)
  assert _entries(workdir) == ["2", "4"]


def test_a_checkpoint_without_its_data_position_restarts_the_order_with_a_warning(
  workdir, caplog, monkeypatch
):
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4", "data"))
  restarts = []
  monkeypatch.setattr(
    pipeline.TrainIterator, "restart_order", lambda iterator, step: restarts.append(step)
  )
  with caplog.at_level(logging.WARNING):
    loop.train_and_evaluate(_config(5), workdir)
  missing = os.path.join(workdir, "checkpoints", "4", "data", "process_0-of-1.json")
  assert f"Checkpoint 4 has no data position {missing}" in _warnings(caplog)
  assert restarts == [4]


def test_a_state_with_a_non_finite_value_is_never_saved(tmp_path):
  checkpointer = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=2)
  state = {"params": {"w": jnp.array([1.0, jnp.nan])}, "step": jnp.array(1)}
  with pytest.raises(
    FloatingPointError,
    match=r"checkpoints/1: the state's params/w holds"
    r" non-finite values",
  ):
    checkpointer.save(1, state, None, force=True)
  checkpointer.close()
  assert _entries(tmp_path) == []


def _small_state(step: int) -> dict:
  return {"params": {"w": jnp.arange(4.0) * step}, "step": jnp.array(step)}


# Adds files to a directory as fast as it can until the directory is gone (or 3 s passed), in
# another process, as the TensorStore writes of a failed save go on landing for a moment after it.
_WRITER = """
import os, sys, time
directory, deadline = sys.argv[1], time.monotonic() + 3
try:
  for i in range(10**9):
    if time.monotonic() > deadline: break
    with open(os.path.join(directory, f"chunk{i}"), "wb") as f: f.write(b"x")
except FileNotFoundError:
  pass
"""


def test_an_unfinished_save_still_being_written_is_deleted_once_its_writes_end(tmp_path):
  unfinished = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp"
  data_dir = unfinished / "state" / "ocdbt.process_0" / "d"
  data_dir.mkdir(parents=True)
  with subprocess.Popen([sys.executable, "-c", _WRITER, str(data_dir)]) as writer:
    while writer.poll() is None and len(os.listdir(data_dir)) < 100:  # delete amid the writes
      time.sleep(0.01)
    checkpointer = checkpoint.Checkpointer(
      str(tmp_path), every_steps=1, keep=2, delete_unfinished=True
    )
  assert not unfinished.exists()
  checkpointer.save(6, _small_state(6), None, force=True)
  checkpointer.close()
  assert _entries(tmp_path) == ["6"]


def test_a_save_that_is_dropped_without_an_error_is_reported(tmp_path, monkeypatch):
  checkpointer = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=2)
  checkpointer.save(1, _small_state(1), None, force=True)
  monkeypatch.setattr(checkpointer._manager, "save", lambda step, **_: True)  # writes nothing
  checkpointer.save(2, _small_state(2), None, force=True)
  with pytest.raises(
    checkpoint.CheckpointError,
    match=rf"Saving checkpoint\(s\) \[2\] in {tmp_path}/checkpoints did not"
    r" finish, though no error was raised .* Finished checkpoints: \[1\]",
  ):
    checkpointer.wait()
  checkpointer.close()
  assert _entries(tmp_path) == ["1"]


def test_checksums_see_any_one_changed_value_on_any_sharding():
  values = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  sharded = jax.device_put(values, NamedSharding(parallel.make_mesh(), P("data")))
  found, non_finite = checksums.array_summaries({"a": sharded, "b": jnp.array(True)})
  assert found["a"] == checksums.array_summaries({"a": values})[0]["a"]
  assert not non_finite
  changed = set()
  for i in np.ndindex(values.shape):
    for new in (np.nextafter(values[i], np.inf), -values[i] - 1):
      altered = values.copy()
      altered[i] = new
      changed.add(checksums.array_summaries({"a": altered})[0]["a"])
  assert found["a"] not in changed
  swapped = values.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
  assert checksums.array_summaries({"a": swapped})[0]["a"] != found["a"]
