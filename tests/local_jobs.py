"""Multi-process JAX jobs on this machine, for tests: local processes joined by gloo collectives."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Set by conftest while a test marked `gloo` runs with the machine to itself.
HOLDS_MACHINE = "DIFFUSION_JAX_TEST_HOLDS_MACHINE"


def require_machine() -> None:
  """Fails unless the running test is marked `gloo`, which gives it the machine (conftest)."""
  if "PYTEST_CURRENT_TEST" in os.environ and HOLDS_MACHINE not in os.environ:
    raise RuntimeError(
      f"{os.environ['PYTEST_CURRENT_TEST']} starts a multi-process job: mark it"
      " @pytest.mark.gloo (tests/conftest.py), so that no test runs beside it."
    )


def job_env(num_processes: int = 2, devices_per_process: int = 2) -> dict[str, str]:
  """This environment for the processes of one job; each adds its own JAX_PROCESS_ID.

  The running test must be marked `gloo` (`require_machine`).

  No persistent compilation cache: JAX writes its entries from process 0 only, and
  the keys hold each process's view of the topology, so process 0 would load its
  programs while the others compile them (measured: 4 hits in process 0, none in
  process 1, on a job's second run), and gloo gives up waiting in the first
  collective after 30 s.
  """
  require_machine()
  return dict(
    os.environ,
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    JAX_ENABLE_COMPILATION_CACHE="false",
    JAX_NUM_PROCESSES=str(num_processes),
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
  )


def run_job(
  args: list[str],
  num_processes: int = 2,
  devices_per_process: int = 2,
  timeout: float = 600,
  cwd: str = REPO,
  extra_env: dict[str, str] | None = None,
) -> list[str]:
  """Runs `python ARGS` as every process of one job; asserts each exits 0; their stderr.

  The processes run in `cwd` with `extra_env` added to `job_env`'s variables.

  Each process logs to its own file (a full pipe cannot stall one process while
  another waits for it in a collective), and every process still running when
  the job fails or times out is killed.
  """
  env = dict(job_env(num_processes, devices_per_process), **(extra_env or {}))
  with tempfile.TemporaryDirectory() as log_dir:
    log_paths = [os.path.join(log_dir, f"process_{i}.log") for i in range(num_processes)]
    workers = []
    try:
      for i, log_path in enumerate(log_paths):
        with open(log_path, "w") as log:
          workers.append(
            subprocess.Popen(
              [sys.executable, *args],
              cwd=cwd,
              env=dict(env, JAX_PROCESS_ID=str(i)),
              stdout=subprocess.DEVNULL,
              stderr=log,
              text=True,
            )
          )
      for worker in workers:
        worker.wait(timeout=timeout)
    finally:
      for worker in workers:
        if worker.poll() is None:
          worker.kill()
          worker.wait()
    logs = [open(path).read() for path in log_paths]
  assert [w.returncode for w in workers] == [0] * num_processes, [_first_error(log) for log in logs]
  return logs


def _first_error(log: str) -> str:
  """The log from its first traceback on: what failed, rather than an abort's module list."""
  start = log.find("Traceback")
  return log[start : start + 3000] if start >= 0 else log[-3000:]
