"""The entry points end to end: train a smoke config, then sample it with launch.sample."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import digits
from diffusion_jax import parallel
from diffusion_jax.runs import load_ema_for_sampling
from diffusion_jax.train import loop

import local_jobs  # tests/local_jobs.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_then_sample(tmp_path):
  workdir = str(tmp_path / "run")
  state = loop.train_and_evaluate(digits.get_config("smoke"), workdir)

  model = load_ema_for_sampling(workdir)
  assert model.image_shape == (8, 8, 1) and model.num_classes is None
  assert model.schedule.num_timesteps == 1000 and model.step == int(state.step)
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(model.params), jax.device_get(state.ema_params)
  )
  x = np.zeros((2, *model.image_shape), np.float32)
  assert model.apply_fn(model.params, x, np.array([0, 999]), None).shape == x.shape

  output = tmp_path / "samples"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.sample",
      f"--workdir={workdir}",
      "--num_samples=10",
      "--batch_size=8",
      "--sampler=ddim",
      "--steps=3",
      f"--output={output}",
      f"--compilation_cache={tmp_path / 'xla'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(tmp_path / "xla")  # the sampler's program, for the next run to load
  samples = np.load(output / "samples.npz")["arr_0"]
  assert samples.shape == (10, 8, 8, 1) and samples.dtype == np.uint8
  assert samples.std() > 0  # real images, not a constant fill
  assert (output / "grid.png").exists()
  assert json.loads((output / "settings.json").read_text())["checkpoint_step"] == model.step


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "launch.sample", f"--workdir={tmp_path}", "--num_samples=2"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0 and "config.json" in result.stderr


@pytest.mark.gloo
def test_two_process_training_run(tmp_path):
  """Real multi-host JAX on one machine: 2 processes x 2 CPU devices, gloo collectives."""
  workdir = str(tmp_path / "run")
  logs = local_jobs.run_job(
    ["-m", "launch.train", "--config=configs/digits.py:smoke", f"--workdir={workdir}"]
  )
  assert "Process 1 of 2, 2 local / 4 global devices" in logs[1]
  data_state = os.listdir(os.path.join(workdir, "checkpoints", "4", "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_state)


def test_compilation_cache_directory_and_off_switch(monkeypatch):
  saved = {
    name: getattr(jax.config, name)
    for name in ("jax_compilation_cache_dir", "jax_enable_compilation_cache")
  }
  try:
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", "/somewhere")
    jax.config.update("jax_compilation_cache_dir", None)
    assert parallel.enable_compilation_cache() == "/somewhere/xla"
    assert jax.config.jax_compilation_cache_dir == "/somewhere/xla"
    assert parallel.enable_compilation_cache() == "/somewhere/xla"  # JAX's setting now
    assert parallel.enable_compilation_cache("/elsewhere") == "/elsewhere"
    assert parallel.enable_compilation_cache("") is None
    assert not jax.config.jax_enable_compilation_cache
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
