"""launch/tpu_pod.sh and launch/slurm.sbatch run end to end, with stand-ins for gcloud and srun.

The stand-ins (tests/standins/) go first on PATH; their workers and tasks are
local processes forming a real multi-process JAX run (2 processes x 2 CPU
devices, gloo collectives), as tests/test_launch.py::test_two_process_training_run.

What the stand-ins cannot rehearse:
- TPU metadata and TPU chips: a pod worker gets its coordinator, process count
  and rank from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
  (set by the gcloud stand-in; parallel.maybe_initialize_distributed prefers
  them to --multihost's TPU detection), and computes on CPU devices.
- GCS itself: the pod's workdir is a bucket of a local GCS emulator
  (tests/gcs_emulator.py), which has no IAM, latency or quotas; the Slurm
  job's is a local directory every task sees, as a cluster's shared filesystem.
- The network: the pod workers do not create a venv and pip install from PyPI
  (DIFFUSION_JAX_SETUP activates this test's venv instead, as a VM image with
  the environment installed would); the default setup is checked as text.
- ssh, and Slurm's scheduler and GPUs: no allocation, time limit or requeue
  queue. The tests give the batch script the environment sbatch would, deliver
  a preemption's SIGTERM to every process of the job themselves, and requeue by
  running the script again with the same job id.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest

from diffusion_jax import files, parallel
from diffusion_jax import checkpoint
from diffusion_jax.train import diffusion_task

import local_jobs  # tests/local_jobs.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDINS = os.path.join(REPO, "tests", "standins")
SMOKE = "configs/digits.py:smoke"
TIMEOUT = 600  # seconds a launcher may run: compiling on a loaded 2-core CI machine is slow


def _cluster_env(**extra: str) -> dict[str, str]:
  """This environment with the stand-ins first on PATH and 2 CPU devices per process.

  Its launchers start multi-process jobs: the test must be marked `gloo`.
  """
  local_jobs.require_machine()
  env = dict(os.environ, **extra)
  env.pop("PYTHONDONTWRITEBYTECODE", None)  # a worker's __pycache__ shows which tree it ran
  for name in parallel.COORDINATOR_VARIABLES:  # the launchers' own, not this process's
    env.pop(name, None)
  env.update(
    PATH=os.pathsep.join([STANDINS, os.path.dirname(sys.executable), env["PATH"]]),
    JAX_PLATFORMS="cpu",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    # No persistent compilation cache: JAX's CPU cache keys hold each process's view of the
    # topology, so only process 0, the writer, ever hits it. The others would compile while
    # it waits in the first collective, and gloo gives up after 30 s on a loaded machine.
    JAX_ENABLE_COMPILATION_CACHE="false",
  )
  return env


def _run(command: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
  """Starts `command` in its own process group, its output in `log_path`."""
  with open(log_path, "w") as log:
    return subprocess.Popen(
      command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _finish(process: subprocess.Popen) -> int:
  """Waits for `process`, killing its process group after TIMEOUT; returns its exit code."""
  try:
    return process.wait(timeout=TIMEOUT)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)


def _read(path) -> str:
  with open(path) as f:
    return f.read()


def _records(path) -> list[dict]:
  return [json.loads(line) for line in _read(path).splitlines()]


def _saved_by_both_processes(workdir: str, step: int) -> bool:
  """Whether checkpoint `step` holds the data-iterator state of both processes."""
  saved = files.listdir(files.join(workdir, "checkpoints", str(step), "data"))
  return {"process_0-of-2.json", "process_1-of-2.json"} <= set(saved)


# --- launch/tpu_pod.sh -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pod_run(gcs, tmp_path_factory) -> dict:
  """A 2-worker launch/tpu_pod.sh run of the smoke config (4 steps) through the gcloud stand-in.

  Its workdir is in the GCS emulator's bucket (the workers inherit its
  variables); the workdir and a flag's value hold spaces and quotes. The flag
  is the compilation cache's directory, which launch.train logs (the cache is off).
  """
  root = tmp_path_factory.mktemp("pod")
  workdir = 'gs://bucket/pod runs/it\'s "smoke"'
  cache = root / "xla cache, 'quoted'"
  gcloud_log, output = str(root / "gcloud.jsonl"), str(root / "launch.log")
  env = _cluster_env(
    GCLOUD_STANDIN_LOG=gcloud_log,
    GCLOUD_STANDIN_ROOT=str(root / "tpus"),
    GCLOUD_STANDIN_WORKERS="2",
    DIFFUSION_JAX_SETUP=f". {shlex.quote(sys.prefix)}/bin/activate",
  )
  process = _run(
    [
      "bash",
      "launch/tpu_pod.sh",
      "pod-1",
      "europe-west4-a",
      SMOKE,
      workdir,
      f"--compilation_cache={cache}",
    ],
    env,
    output,
  )
  workers = [root / "tpus" / "pod-1" / f"worker-{i}" for i in range(2)]
  return dict(
    returncode=_finish(process),
    output=_read(output),
    workdir=workdir,
    cache=str(cache),
    calls=[record["argv"] for record in _records(gcloud_log)],
    workers=workers,
    worker_logs=[_read(f"{worker}.log") for worker in workers],
  )


@pytest.mark.gloo
def test_tpu_pod_trains_on_two_workers_with_flags_intact(pod_run):
  assert pod_run["returncode"] == 0, pod_run["output"][-2000:] + pod_run["worker_logs"][0][-3000:]
  scp, ssh = pod_run["calls"]  # the documented two calls, and no other
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert scp[4].endswith("/diffusion_jax.tar.gz")
  assert scp[5:] == ["pod-1:~/diffusion_jax.tar.gz", "--worker=all", "--zone=europe-west4-a"]
  assert (
    ssh[:7]
    == ["compute", "tpus", "tpu-vm", "ssh", "pod-1", "--worker=all", "--zone=europe-west4-a"]
    and len(ssh) == 8
  )
  launch_line = ssh[7].removeprefix("--command=").splitlines()[-1]
  assert shlex.split(launch_line) == [
    "exec",
    "python",
    "-m",
    "launch.train",
    f"--config={SMOKE}",
    f"--workdir={pod_run['workdir']}",
    "--multihost",
    f"--compilation_cache={pod_run['cache']}",
  ]

  for i, log in enumerate(pod_run["worker_logs"]):  # the values arrived intact on both workers
    assert f"Process {i} of 2, 2 local / 4 global devices" in log
    assert f"Compilation cache: {pod_run['cache']}." in log
  assert _saved_by_both_processes(pod_run["workdir"], 4)  # in the bucket
  assert "config.json" in files.listdir(pod_run["workdir"])
  with open(os.path.join(REPO, "launch", "train.py"), "rb") as f:
    train_py = f.read()
  for worker in pod_run["workers"]:  # each worker ran the tree shipped to it...
    assert (worker / "diffusion_jax" / "launch" / "train.py").read_bytes() == train_py
    assert (worker / "diffusion_jax" / "diffusion_jax" / "__pycache__").is_dir()
    # ...and wrote nothing into it, its working directory: no local folder named "gs:".
    assert _files_besides_bytecode(worker / "diffusion_jax") == set(_shipped_files(worker))


def _files_besides_bytecode(root) -> set[str]:
  """The files under `root`, relative to it, less Python's __pycache__ folders."""
  return {
    os.path.relpath(os.path.join(folder, name), root)
    for folder, dirs, names in os.walk(root)
    if "__pycache__" not in folder.split(os.sep)
    for name in names
  }


def test_a_partial_coordinator_override_is_named(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS is set but not JAX_PROCESS_ID"):
    parallel.maybe_initialize_distributed(multihost=True)


def _git(repo, *args: str) -> str:
  return subprocess.run(
    ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
    check=True,
    capture_output=True,
    text=True,
  ).stdout


def _shipped_files(home) -> dict[str, bytes]:
  """The files of the archive tpu_pod.sh copied to a worker's home, by path."""
  with tarfile.open(home / "diffusion_jax.tar.gz") as archive:
    return {
      member.name.removeprefix("./"): archive.extractfile(member).read()
      for member in archive.getmembers()
      if member.isfile()
    }


@pytest.mark.gloo
def test_tpu_pod_ships_the_checkout_or_a_pinned_ref_and_installs_it(tmp_path):
  repo = tmp_path / "checkout"
  (repo / "launch").mkdir(parents=True)
  (repo / "launch" / "tpu_pod.sh").write_bytes(
    open(os.path.join(REPO, "launch", "tpu_pod.sh"), "rb").read()
  )
  (repo / ".gitignore").write_text(".venv/\n")
  (repo / "notes.txt").write_text("v1")
  (repo / "gone.txt").write_text("deleted after v1")
  _git(repo, "init", "-q")
  _git(repo, "add", ".")
  _git(repo, "commit", "-qm", "v1")
  _git(repo, "tag", "v1")
  (repo / "notes.txt").write_text("v2")
  _git(repo, "commit", "-qam", "v2")
  (repo / "notes.txt").write_text("v3, not committed")  # the working tree differs from both
  (repo / "new.py").write_text("untracked")
  (repo / ".venv").mkdir()
  (repo / ".venv" / "huge").write_text("ignored")
  (repo / "gone.txt").unlink()

  def launch(name, checkout=repo, **extra):
    """Runs the script with ssh left out: (exit code, output, the calls, worker 0's home)."""
    log = tmp_path / f"{name}.jsonl"
    env = _cluster_env(
      GCLOUD_STANDIN_LOG=str(log),
      GCLOUD_STANDIN_DRY_RUN="1",
      GCLOUD_STANDIN_ROOT=str(tmp_path / "tpus" / name),
    )
    for variable in ("DIFFUSION_JAX_SETUP", "DIFFUSION_JAX_REF"):
      env.pop(variable, None)
    env.update(extra)
    result = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "pod", "zone", "configs/x.py", "gs://b/r"],
      cwd=checkout,
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
    )
    calls = [record["argv"] for record in _records(log)] if log.exists() else []
    return result.returncode, result.stderr, calls, tmp_path / "tpus" / name / "pod" / "worker-0"

  code, output, calls, home = launch("checkout")
  assert code == 0, output
  assert _shipped_files(home) == {
    ".gitignore": b".venv/\n",
    "launch/tpu_pod.sh": (repo / "launch" / "tpu_pod.sh").read_bytes(),
    "notes.txt": b"v3, not committed",
    "new.py": b"untracked",
  }
  remote = calls[1][-1].removeprefix("--command=").splitlines()
  assert remote[3:6] == [  # the default set-up, as documented
    "python3 -m venv ~/diffusion_jax_venv",
    ". ~/diffusion_jax_venv/bin/activate",
    "pip install -q -e . 'jax[tpu]'",
  ]

  code, output, _, home = launch("pinned", DIFFUSION_JAX_REF="v1")
  assert code == 0 and _git(repo, "rev-parse", "v1").strip() in output, output
  shipped = _shipped_files(home)
  assert shipped["notes.txt"] == b"v1" and shipped["gone.txt"] == b"deleted after v1"
  assert "new.py" not in shipped

  code, output, calls, _ = launch("unknown", DIFFUSION_JAX_REF="no-such-ref")
  assert code != 0 and "no-such-ref" in output and not calls

  download = tmp_path / "unzipped"  # not a git checkout: all but .git and .venv
  shutil.copytree(repo, download, ignore=shutil.ignore_patterns(".git"))
  code, output, _, home = launch("download", checkout=download)
  assert code == 0, output
  assert sorted(_shipped_files(home)) == [".gitignore", "launch/tpu_pod.sh", "new.py", "notes.txt"]


# --- launch/slurm.sbatch -----------------------------------------------------------------------


def _slurm_job_id() -> str:
  """A job id whose coordinator port (JAX: 61440 + id % 4096) is free on this machine."""
  for job_id in np.random.default_rng().permutation(4096):
    with socket.socket() as s:
      try:
        s.bind(("", 61440 + int(job_id)))
      except OSError:
        continue
    return str(100000 + job_id)
  raise RuntimeError("No free port in 61440-65535 for a Slurm coordinator.")


def _batch_environment(tmp_path, job_id: str) -> dict[str, str]:
  """What sbatch --nodes=2 gives launch/slurm.sbatch (a task per node, 2 GPUs each), + stand-ins."""
  return _cluster_env(
    SLURM_JOB_ID=job_id,
    SLURM_JOB_NODELIST="localhost,127.0.0.1",
    SLURM_JOB_NUM_NODES="2",
    SLURM_NNODES="2",
    SLURM_NTASKS="2",
    SLURM_NTASKS_PER_NODE="1",
    SLURM_GPUS_ON_NODE="2",
    SLURM_SUBMIT_DIR=REPO,
    SRUN_STANDIN_LOG=str(tmp_path / "srun.jsonl"),
    DIFFUSION_JAX_VENV=sys.prefix,
  )  # no .venv in the checkout: the test's own venv


def _wait_for(text: str, count: int, log_path, process: subprocess.Popen) -> None:
  """Returns once `text` appears `count` times in the log; fails if the job ends first."""
  deadline = time.monotonic() + TIMEOUT
  while _read(log_path).count(text) < count:
    assert process.poll() is None, f"ended before {text!r}: {_read(log_path)[-3000:]}"
    assert time.monotonic() < deadline, f"no {text!r} after {TIMEOUT} s"
    time.sleep(0.2)


def _final_parameters(workdir: str) -> dict:
  """The step, parameters and EMA parameters of the run's latest checkpoint, on the host."""
  exp = diffusion_task.build(checkpoint.load_config(workdir))
  abstract = jax.eval_shape(exp.init_state, jax.random.PRNGKey(0))
  fields = {"step": abstract.step, "params": abstract.params, "ema_params": abstract.ema_params}
  replicated = parallel.replicated(parallel.make_mesh())
  checkpointer = checkpoint.Checkpointer(workdir, every_steps=1, keep=1 << 30)
  restored = checkpointer.restore_fields(
    checkpoint.restore_target(fields, jax.tree.map(lambda _: replicated, fields))
  )
  checkpointer.close()
  return jax.device_get(restored)


@pytest.mark.gloo
def test_slurm_preempted_job_saves_and_its_requeue_ends_as_an_unbroken_run(pod_run, tmp_path):
  workdir = str(tmp_path / "run")
  env = _batch_environment(tmp_path, _slurm_job_id())
  command = ["bash", "launch/slurm.sbatch", SMOKE, workdir]
  first_log = tmp_path / "slurm-first.out"
  job = _run(command, env, first_log)
  _wait_for("Training UNet for 4 steps from step 0", 2, first_log, job)  # both tasks at step 0
  os.killpg(job.pid, signal.SIGTERM)  # a preemption signals every process of the job
  assert _finish(job) == 0, _read(first_log)[-5000:]

  start, end = _records(tmp_path / "srun.jsonl")
  assert start["argv"] == [
    "--kill-on-bad-exit=1",
    "python",
    "-m",
    "launch.train",
    f"--config={SMOKE}",
    f"--workdir={workdir}",
  ]
  assert [
    (task["SLURM_PROCID"], task["SLURM_LOCALID"], task["JAX_LOCAL_DEVICE_IDS"])
    for task in start["tasks"]
  ] == [("0", "0", "0,1"), ("1", "0", "0,1")]
  assert end["exit_codes"] == [0, 0]  # both tasks stopped cleanly...
  stopped = max(
    int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()
  )
  assert 0 < stopped < 4 and _saved_by_both_processes(workdir, stopped)  # ...after saving one step

  env["SLURM_RESTART_COUNT"] = "1"  # Slurm requeues the job under its id: the same script again
  second_log = tmp_path / "slurm-requeued.out"
  assert _finish(_run(command, env, second_log)) == 0, _read(second_log)[-5000:]
  assert _read(second_log).count(f"Training UNet for 4 steps from step {stopped}") == 2
  # The pod's unbroken run of the same job, in the bucket: gs:// and a local disk end alike.
  requeued, unbroken = _final_parameters(workdir), _final_parameters(pod_run["workdir"])
  assert int(requeued["step"]) == int(unbroken["step"]) == 4
  jax.tree.map(np.testing.assert_array_equal, requeued, unbroken)


@pytest.mark.gloo
def test_slurm_without_a_virtualenv_says_where_it_looked(tmp_path):
  env = _batch_environment(tmp_path, "1")
  env["DIFFUSION_JAX_VENV"] = str(tmp_path / "no venv")
  result = subprocess.run(
    ["bash", "launch/slurm.sbatch", SMOKE, str(tmp_path / "run")],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 1 and f"no virtualenv at {tmp_path / 'no venv'}" in result.stderr
  assert not os.path.exists(tmp_path / "srun.jsonl")  # srun never ran
