"""Test-wide setup: 8 fake CPU devices, compilation and model caches, the repository on sys.path."""

import contextlib
import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator

import pytest

import local_jobs  # tests/local_jobs.py

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The digits classifier of the offline evaluation is trained once and cached here (subprocesses too).
os.environ.setdefault(
  "DIFFUSION_JAX_CACHE", os.path.join(tempfile.gettempdir(), "diffusion_jax_test_models")
)

# Training tests compile the same small programs in several runs, in this process and in the
# launchers they start (which inherit these variables): one cache for all of them.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffusion_jax_test_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# configs/ and launch/ live at the repository root, beside the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def digits_smoke_run(tmp_path_factory) -> str:
  """The workdir of a finished configs/digits.py:smoke run (4 steps), shared by a worker's tests."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax.train import loop  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp("digits_smoke"))
  loop.train_and_evaluate(digits.get_config("smoke"), workdir)
  return workdir


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> str:
  """A .pth of the FID Inception's keys with random weights (not the published file)."""
  torch = pytest.importorskip("torch")
  from benchmarks import peers  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
  torch.save({k: torch.from_numpy(v) for k, v in peers.random_inception_state_dict().items()}, path)
  return str(path)


# A test marked `gloo` starts a JAX job of several processes joined by gloo collectives, and
# has the machine to itself (`_machine`): gloo gives up after 30 s when one process of a job
# reaches its first collective that much later than another, as it does when a test on the
# other xdist worker starves one process of CPU while it compiles. local_jobs refuses to
# start such a job from an unmarked test (`local_jobs.HOLDS_MACHINE`).


def _module(item) -> str:
  return item.module.__name__.rpartition(".")[2]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
  """Each module's tests run on one xdist worker (its module fixtures are built once).
  A test marked with its own `xdist_group` keeps it."""
  for item in items:
    if not item.get_closest_marker("xdist_group"):
      item.add_marker(pytest.mark.xdist_group(_module(item)))


@contextlib.contextmanager
def _machine(exclusive: bool) -> Iterator[None]:
  """Holds this test run's machine lock, shared or exclusive, across xdist workers.

  A readers-writer lock from two flock(2) files: a test that wants the machine
  alone first closes the turnstile, so no new test starts beside it, then waits
  for the test running beside it to end. Without xdist it costs two flock calls.
  """
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
  paths = [
    os.path.join(tempfile.gettempdir(), f"diffusion_jax_tests_{run}.{name}.lock")
    for name in ("turnstile", "machine")
  ]
  with open(paths[0], "a") as turnstile, open(paths[1], "a") as machine:
    fcntl.flock(turnstile, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    if not exclusive:
      fcntl.flock(turnstile, fcntl.LOCK_UN)  # passed through: a waiting exclusive test goes next
    fcntl.flock(machine, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
      yield
    finally:
      fcntl.flock(machine, fcntl.LOCK_UN)
      fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """Runs each test (setup, call, teardown) under the machine lock: exclusive for a test
  marked `gloo`, which may then start multi-process jobs; shared for the rest."""
  exclusive = item.get_closest_marker("gloo") is not None
  with _machine(exclusive), pytest.MonkeyPatch.context() as patch:
    if exclusive:
      patch.setenv(local_jobs.HOLDS_MACHINE, item.nodeid)
    else:
      patch.delenv(local_jobs.HOLDS_MACHINE, raising=False)
    return (yield)


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
