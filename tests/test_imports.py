"""Quiet launchers: no TensorFlow where no TFDS data is read, and no TensorFlow banner where it is."""

import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `python -m MODULE ARGS...` (as a launcher is run), then prints the TensorFlow
# modules it imported when the interpreter exits, after absl's app.run has exited.
_RUN_MODULE_THEN_LIST_TF = """
import atexit, runpy, sys
atexit.register(lambda: print("TF modules:", sorted(
    m for m in sys.modules if m.partition(".")[0] in ("tensorflow", "tensorflow_datasets"))))
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
  )


def _tf_modules(result: subprocess.CompletedProcess) -> str:
  """What `_RUN_MODULE_THEN_LIST_TF` printed: '[]' when no TensorFlow module was imported."""
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.strip().splitlines()[-1].removeprefix("TF modules: ")


def test_sampling_a_digits_run_imports_no_tensorflow(digits_smoke_run, tmp_path):
  result = _run(
    "-c",
    _RUN_MODULE_THEN_LIST_TF,
    "launch.sample",
    f"--workdir={digits_smoke_run}",
    "--num_samples=8",
    "--batch_size=8",
    "--steps=2",
    f"--output={tmp_path}",
    "--compilation_cache=",
  )
  assert _tf_modules(result) == "[]"
  assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (8, 8, 8, 1)
  assert "oneDNN" not in result.stderr


def test_evaluating_a_samples_file_imports_no_tensorflow(tmp_path):
  samples = tmp_path / "real.npz"
  np.savez(samples, arr_0=sources.digits_source("test").images[:64])
  result = _run(
    "-c",
    _RUN_MODULE_THEN_LIST_TF,
    "launch.evaluate",
    "--config=configs/eval/digits.py:smoke",
    "--config.metrics=('fd_digits',)",
    "--config.real_floor=False",
    f"--workdir={tmp_path / 'no_run'}",
    f"--samples={samples}",
    "--compilation_cache=",
  )
  assert _tf_modules(result) == "[]"
  assert "fd_digits" in result.stdout  # the report's table: it ran to the end
  assert any(
    name.startswith("events.out.tfevents")  # its TensorBoard scalars, written without TF
    for name in os.listdir(tmp_path / "no_run" / "eval" / "digits-real")
  )


@pytest.mark.parametrize(
  "launcher", ["launch.convert", "launch.sample", "launch.segment", "launch.train"]
)
def test_launchers_that_read_no_tfds_data_import_no_tensorflow(launcher):
  """Neither through a metric writer (clu's import TF: seconds per launch) nor through TFDS
  (the data sources import it when a run reads TFDS data)."""
  result = _run(
    "-c",
    f"import sys, {launcher}; print('TF modules:', sorted(m for m in"
    " sys.modules if m.partition('.')[0] in ('tensorflow', 'tensorflow_datasets')))",
  )
  assert _tf_modules(result) == "[]"


def test_launch_package_silences_tensorflows_start_up_log():
  """Where TF is imported (training, TFDS data), its oneDNN banner stays off stderr."""
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")
  }
  result = _run("-c", "import launch, tensorflow", env=env)
  assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
