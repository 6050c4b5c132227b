"""Resuming a run after a config change, on another mesh, or in another number of processes."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import digits
from diffusion_jax import checkpoint, data, parallel
from diffusion_jax.data import pipeline
from diffusion_jax.train import loop, run_config

import local_jobs  # tests/local_jobs.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(**train_overrides):
  config = digits.get_config("smoke")  # 4 steps, checkpoints every 2, the last 2 kept
  config.train.update(**train_overrides)
  return config


def _files(workdir: str) -> dict[str, bytes]:
  """Every file under `workdir` by relative path, with its bytes."""
  found = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, workdir)] = f.read()
  return found


def _history(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, run_config.HISTORY_FILE)) as f:
    return [json.loads(line) for line in f]


# Resume after a config change.


def test_resume_rules_and_fields_missing_on_one_side():
  keys = (
    "model.ch",
    "model.remat",
    "diffusion.loss",
    "optim.optimizer",
    "optim.lr",
    "seed",
    "data.seed",
    "data.num_threads",
    "train.batch_size",
    "train.num_steps",
    "new.key",
  )
  assert [run_config.rule(key) for key in keys] == [
    run_config.FIXED_BY_CHECKPOINT,
    run_config.MAY_CHANGE,
    run_config.FIXED_BY_CHECKPOINT,
    run_config.FIXED_BY_CHECKPOINT,
    run_config.MAY_CHANGE,
    run_config.FIXED_BY_RUN,
    run_config.FIXED_BY_RUN,
    run_config.MAY_CHANGE,
    run_config.FIXED_BY_RUN,
    run_config.MAY_CHANGE,
    run_config.FIXED_BY_CHECKPOINT,
  ]
  defaults = run_config.default_values("ddpm_cifar10")
  assert defaults["model.dtype"] == "float32" and defaults["model.ch"] == 128  # the zoo entry's
  saved = {"model.name": "ddpm_cifar10", "model.ch": 32, "train.num_steps": 4, "data.seed": 0}
  new_at_defaults = {
    **saved,
    "model.dtype": "float32",
    "model.remat": False,
    "train.label_dropout": None,
    "optim.b2": 0.999,
  }
  assert run_config.changes(saved, new_at_defaults, defaults) == []  # new fields, at defaults
  new = {
    **new_at_defaults,
    "model.dtype": "bfloat16",
    "train.num_steps": 8,
    "model.ch": 64,
    "model.made_up": 1,
    "data.seed": 1,
  }
  found = run_config.changes(saved, new, defaults)
  assert [str(change) for change in found] == [
    "data.seed 0 → 1",
    "model.ch 32 → 64",
    'model.dtype "float32" → "bfloat16"',
    "model.made_up (unset) → 1",
    "train.num_steps 4 → 8",
  ]

  def refused(holds):
    return [change.key for change in run_config.refused_changes(found, holds)]

  assert refused("a trained run") == ["data.seed", "model.ch", "model.dtype", "model.made_up"]
  assert refused("weights") == ["model.ch", "model.dtype", "model.made_up"]  # fine-tuning
  assert refused("no checkpoint") == []


def test_changed_model_width_is_refused_in_one_line_and_nothing_is_written(
  digits_smoke_run, tmp_path
):
  workdir = str(tmp_path / "run")
  shutil.copytree(digits_smoke_run, workdir)
  before = _files(workdir)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.train",
      "--config=configs/digits.py:smoke",
      f"--workdir={workdir}",
      "--config.model.ch=64",
      "--config.diffusion.num_timesteps=500",
      "--config.train.num_steps=6",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert message == (
    f"launch.train: Cannot resume {workdir}: the config changes fields that its checkpoint"
    " (a trained run) fixes: diffusion.num_timesteps 1000 → 500, model.ch 32 → 64. Start a"
    f" new workdir, or rerun with the values in {workdir}/config.json; nothing was written."
  )
  assert _files(workdir) == before  # config.json's bytes included; no history, no checkpoint


def test_raised_num_steps_continues_the_run_and_is_recorded(digits_smoke_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(digits_smoke_run, workdir)
  state = loop.train_and_evaluate(_smoke(num_steps=5, sample_steps=3), workdir)
  assert int(state.step) == 5
  assert checkpoint.load_config(workdir).train.num_steps == 5
  [entry] = _history(workdir)
  assert entry["step"] == 4
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", entry["time"])
  assert entry["changes"] == {"train.num_steps": [4, 5], "train.sample_steps": [5, 3]}
  loop.train_and_evaluate(_smoke(num_steps=5, sample_steps=3), workdir)  # nothing left to do
  assert len(_history(workdir)) == 1  # and nothing changed


# Elastic restarts: another mesh, another number of processes.


def _saved_state(workdir: str, step: int) -> dict:
  """Checkpoint `step`'s train state as numpy arrays, read without any mesh."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  reader = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(
    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), reader.metadata(path).item_metadata.tree
  )
  return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def _assert_bit_equal(restored, saved: dict):
  for field, value in saved.items():
    for x, y in zip(jax.tree.leaves(getattr(restored, field)), jax.tree.leaves(value), strict=True):
      np.testing.assert_array_equal(x, y, err_msg=field)


def _record_restores(monkeypatch) -> list:
  """Each state the loop restores, as (numpy copy, devices its parameters are on)."""
  restores = []
  restore = checkpoint.Checkpointer.restore

  def recording(self, *args, **kwargs):
    state = restore(self, *args, **kwargs)
    if state is not None:
      devices = jax.tree.leaves(state.params)[0].sharding.device_set
      restores.append((jax.device_get(state), len(devices)))
    return state

  monkeypatch.setattr(checkpoint.Checkpointer, "restore", recording)
  return restores


_MAKE_MESH = parallel.make_mesh


def _train_on_devices(monkeypatch, count: int):
  """Makes the loop's mesh from the first `count` of the 8 fake devices."""
  monkeypatch.setattr(
    loop.parallel,
    "make_mesh",
    lambda model_parallelism=1: _MAKE_MESH(model_parallelism, jax.devices()[:count]),
  )


def _logged_losses(caplog) -> dict[int, float]:
  """{step: loss} from the metric writer's log lines ("[4] ... loss=0.93, ...")."""
  return {
    int(match[1]): float(match[2])
    for record in caplog.records
    if (match := re.match(r"\[(\d+)\].* loss=([^,\s]+)", record.getMessage()))
  }


def _data_state(workdir: str, step: int) -> dict[str, dict]:
  """Checkpoint `step`'s data positions, by grain's file name (one file per process)."""
  directory = os.path.join(workdir, "checkpoints", str(step), "data")
  return {
    name: json.loads(content)
    for name, content in _files(directory).items()
    if name.endswith(".json")
  }


def test_checkpoint_on_8_devices_resumes_on_4_and_then_on_1(tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  workdir = str(tmp_path)
  restores = _record_restores(monkeypatch)
  eight = loop.train_and_evaluate(_smoke(num_steps=2, model_parallelism=2), workdir)  # 4 x 2
  assert any(parallel.MODEL_AXIS in x.sharding.spec for x in jax.tree.leaves(eight.params))
  saved = _saved_state(workdir, 2)

  _train_on_devices(monkeypatch, 4)
  loop.train_and_evaluate(_smoke(num_steps=4), workdir)  # model_parallelism 2 -> 1
  state, num_devices = restores[-1]
  assert num_devices == 4 and int(state.step) == 2
  _assert_bit_equal(state, saved)
  assert _data_state(workdir, 4) == {
    "process_0-of-1.json": {"next_index": 4, "order_start_step": 0}
  }
  saved = _saved_state(workdir, 4)

  _train_on_devices(monkeypatch, 1)
  final = loop.train_and_evaluate(_smoke(num_steps=5), workdir)
  state, num_devices = restores[-1]
  assert num_devices == 1 and int(state.step) == 4
  _assert_bit_equal(state, saved)
  assert int(final.step) == 5
  losses = _logged_losses(caplog)
  assert {4, 5} <= set(losses) and np.all(np.isfinite(list(losses.values()))), losses
  assert [entry["changes"] for entry in _history(workdir)] == [
    {"train.model_parallelism": [2, 1], "train.num_steps": [2, 4]},
    {"train.num_steps": [4, 5]},
  ]


@pytest.mark.gloo
def test_two_process_checkpoint_resumes_in_one_process_with_a_warning(
  tmp_path, monkeypatch, caplog
):
  caplog.set_level(logging.INFO)
  workdir = str(tmp_path)
  local_jobs.run_job(
    ["-m", "launch.train", "--config=configs/digits.py:smoke", f"--workdir={workdir}"]
  )  # 2 processes x 2 CPU devices, 4 steps
  assert set(_data_state(workdir, 4)) == {"process_0-of-2.json", "process_1-of-2.json"}
  saved = _saved_state(workdir, 4)
  restores = _record_restores(monkeypatch)

  final = loop.train_and_evaluate(_smoke(num_steps=6), workdir)  # 1 process, 8 devices
  [(state, num_devices)] = restores
  assert num_devices == 8
  _assert_bit_equal(state, saved)
  assert re.search(
    r"Checkpoint 4 has no data position \S+/process_0-of-1\.json \(it holds that of"
    r" 2 process\(es\)\)",
    caplog.text,
  )
  assert "fresh data order seeded by step 4" in caplog.text
  assert int(final.step) == 6
  losses = _logged_losses(caplog)
  assert {6} <= set(losses) and np.all(np.isfinite(list(losses.values()))), losses
  # The fresh order is named in the checkpoint, so the next resume continues it exactly.
  assert _data_state(workdir, 6) == {
    "process_0-of-1.json": {"next_index": 2, "order_start_step": 4}
  }


def test_fresh_data_order_is_deterministic_and_resumes_exactly():
  config = data.DataConfig.from_mapping(_smoke().data)
  assert pipeline.order_seed(7, 0) == 7 and pipeline.order_seed(7, 40) != pipeline.order_seed(7, 41)
  original = data.make_train_iterator(config, 8)
  first = [next(original)["image"] for _ in range(3)]

  fresh = data.make_train_iterator(config, 8)
  fresh.restart_order(40)
  again = data.make_train_iterator(config, 8)
  again.restart_order(40)
  fresh_batches = [next(fresh)["image"] for _ in range(3)]
  assert not np.array_equal(fresh_batches[0], first[0])  # another order
  for batch in fresh_batches:
    np.testing.assert_array_equal(next(again)["image"], batch)  # the same on every rerun

  state = fresh.get_state()
  assert state == {"next_index": 3, "order_start_step": 40}
  resumed = data.make_train_iterator(config, 8)  # built in the order of step 0
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["image"], next(fresh)["image"])

  saved_before_the_key_existed = data.make_train_iterator(config, 8)
  saved_before_the_key_existed.set_state({"next_index": 1})
  np.testing.assert_array_equal(next(saved_before_the_key_existed)["image"], first[1])
