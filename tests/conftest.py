"""Test-wide setup: 8 fake CPU devices, compilation and model caches, the repository on sys.path."""

import os
import sys
import tempfile
from collections.abc import Iterator

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The digits classifier of the offline evaluation is trained once and cached here (subprocesses too).
os.environ.setdefault("DIFFUSION_JAX_CACHE",
                      os.path.join(tempfile.gettempdir(), "diffusion_jax_test_models"))

import jax  # noqa: E402  (after XLA_FLAGS)

# Training tests compile the same small programs in several runs; reuse them.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "diffusion_jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# configs/ and launch/ live at the repository root, beside the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def digits_smoke_run(tmp_path_factory) -> str:
  """The workdir of a finished configs/digits.py:smoke run (4 steps), shared by a worker's tests."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp("digits_smoke"))
  train.train_and_evaluate(digits.get_config("smoke"), workdir)
  return workdir


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> str:
  """A .pth of the FID Inception's keys with random weights (not the published file)."""
  torch = pytest.importorskip("torch")
  from benchmarks import peers  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
  torch.save({k: torch.from_numpy(v) for k, v in peers.random_inception_state_dict().items()},
             path)
  return str(path)


# Modules whose tests start several JAX processes joined by gloo: with `--dist loadgroup`
# they share one xdist group, so no two such jobs compete for the cores at once (gloo
# gives up after 30 s in a collective when a peer is starved).
MULTIPROCESS_MODULES = frozenset({
    "test_cluster_launchers", "test_elastic", "test_evaluate_hosts", "test_gcs", "test_launch",
    "test_resilience", "test_sample_hosts"})


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
  """Each module's tests run on one xdist worker (its module fixtures are built once);
  the multi-process modules all on one worker, one after another. A test marked with
  its own `xdist_group` keeps it."""
  for item in items:
    if item.get_closest_marker("xdist_group"):
      continue
    module = item.module.__name__.rpartition(".")[2]
    group = "multiprocess" if module in MULTIPROCESS_MODULES else module
    item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def gcs() -> Iterator:
  """A local GCS emulator holding the empty bucket "bucket" (tests/gcs_emulator.py).

  Its variables are set in this process for the session, so gs:// paths read
  here and the launchers run as subprocesses reach it.
  """
  import gcs_emulator  # pylint: disable=g-import-not-at-top  (tests/; the session may not need it)

  emulator = gcs_emulator.GcsEmulator()
  try:
    emulator.create_bucket("bucket")
    with pytest.MonkeyPatch.context() as patch:
      for name, value in gcs_emulator.environment(emulator.url).items():
        patch.setenv(name, value)
      yield emulator
  finally:
    emulator.stop()
