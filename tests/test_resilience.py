"""Runs that survive what clusters do: SIGTERM to one or all processes, kill -9, bad steps, disks.

The multi-process tests start real `launch.train` jobs (2 processes, gloo on
CPU) and continue one workdir through a chain of interruptions; its end state
must equal an unbroken job's bit for bit.
"""

import contextlib
import ctypes
import dataclasses
import functools
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from configs import digits
from diffusion_jax import checkpoint, data, parallel
from diffusion_jax.train import diffusion_step, loop, tasks
from diffusion_jax.train.state import compute_metrics

import local_jobs  # tests/local_jobs.py
import saved_runs  # tests/saved_runs.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The jobs: digits:smoke with a metric line per step (what the tests read) and a checkpoint
# every 4 steps (saves to kill -9 inside).
NUM_STEPS = 24
JOB_FLAGS = [
  "--config=configs/digits.py:smoke",
  f"--config.train.num_steps={NUM_STEPS}",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=4",
]
HOOKED_LAUNCH = os.path.join(REPO, "tests", "hooked_launch.py")


class _Job:
  """One `launch.train` job over 2 processes on this machine, each logging to a file.

  Each process runs through tests/hooked_launch.py with its entry of `hooks`
  (that script's environment variables) added to its environment.
  """

  def __init__(self, workdir, log_dir, name: str, hooks=({}, {})):
    env = local_jobs.job_env(len(hooks), devices_per_process=1)
    self.log_paths = [log_dir / f"{name}.process_{i}.log" for i in range(len(hooks))]
    self.processes = []
    for i, (log_path, hook) in enumerate(zip(self.log_paths, hooks)):
      with open(log_path, "w") as log:
        self.processes.append(
          subprocess.Popen(
            [sys.executable, HOOKED_LAUNCH, "launch.train", f"--workdir={workdir}", *JOB_FLAGS],
            cwd=REPO,
            env=dict(env, JAX_PROCESS_ID=str(i), **hook),
            stdout=subprocess.DEVNULL,
            stderr=log,
          )
        )

  def log(self, i: int) -> str:
    return self.log_paths[i].read_text()

  def logged_steps(self) -> list[int]:
    return [int(step) for step in re.findall(r"\] \[(\d+)\] grad_norm", self.log(0))]

  def wait_for(self, pattern: str, timeout=600) -> None:
    """Until process 0 logs `pattern`; fails if a process ends first (the timeout catches a hang)."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, self.log(0)):
      assert time.monotonic() < deadline, self.log(0)[-3000:]
      assert all(p.poll() is None for p in self.processes), self.log(0)[-3000:]
      time.sleep(0.05)

  def kill(self) -> None:
    for process in self.processes:
      process.kill()

  def wait(self, timeout=600) -> list[int]:
    try:
      return [p.wait(timeout) for p in self.processes]
    finally:
      self.kill()  # nothing outlives a failed wait


def _finished_steps(workdir) -> list[int]:
  return sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())


def _unfinished(workdir) -> list[str]:
  return [name for name in os.listdir(workdir / "checkpoints") if "tmp" in name]


def _job_config():
  """The config of JOB_FLAGS, to read the jobs' checkpoints here."""
  config = digits.get_config("smoke")
  config.train.update(num_steps=NUM_STEPS, log_every=1, checkpoint_every=4)
  return config


def _assert_equal_states(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def unbroken_job(tmp_path_factory):
  """The workdir of a 2-process job run to the end without interruption."""
  workdir = tmp_path_factory.mktemp("unbroken") / "run"
  job = _Job(workdir, workdir.parent, "unbroken")
  assert job.wait() == [0, 0], job.log(0)[-3000:]
  return workdir


@dataclasses.dataclass
class _Stage:
  """What one job on the interrupted workdir did."""

  job: _Job
  returncodes: list[int]
  finished: list[int]  # the finished checkpoints' steps after it
  unfinished: list[str]  # Orbax's temporary directories left after it


def _stage(
  workdir, name: str, hooks=({}, {}), kill_at: str | None = None, delay: float = 0.0
) -> _Stage:
  """Runs a job on `workdir` with `hooks`; kills it (-9) `delay` s after it logs `kill_at`."""
  job = _Job(workdir, workdir.parent, name, hooks)
  if kill_at is not None:
    job.wait_for(kill_at)
    time.sleep(delay)
    job.kill()
  returncodes = job.wait()
  print(f"{name}: steps {job.logged_steps()[:1]}..{job.logged_steps()[-1:]}, exit {returncodes}.")
  return _Stage(job, returncodes, _finished_steps(workdir), _unfinished(workdir))


@pytest.fixture(scope="module")
def interrupted_job(tmp_path_factory):
  """One workdir through SIGTERM to both processes (after step 3), to process 1 only (after
  step 6), kill -9 inside a save, kill -9 at a seeded moment, and a last job to the end."""
  workdir = tmp_path_factory.mktemp("interrupted") / "run"
  sigterm = lambda step: {"TEST_SIGTERM_AFTER_STEP": str(step)}
  stages = {"sigterm_both": _stage(workdir, "sigterm_both", (sigterm(3), sigterm(3)))}
  stages["sigterm_one"] = _stage(workdir, "sigterm_one", ({}, sigterm(6)))
  stages["kill_in_save"] = _stage(
    workdir, "kill_in_save", ({"TEST_PAUSE_IN_SAVE": "1"}, {}), kill_at="Paused inside the save of "
  )
  delay = random.Random(0).uniform(0.0, 2.0)  # any moment will do: seeded, to reproduce
  stages["kill_at_random"] = _stage(
    workdir, "kill_at_random", kill_at=r"\] \[\d+\] grad_norm", delay=delay
  )
  stages["final"] = _stage(workdir, "final")
  return workdir, stages


def _stopped_at(job: _Job) -> list[int]:
  """The step each process says it saved and stopped at."""
  return [
    int(step)
    for i in range(2)
    for step in re.findall(r"Stop requested \(SIGTERM\): saved step (\d+)", job.log(i))
  ]


def _restored_step(job: _Job) -> int | None:
  found = re.findall(r"Restored checkpoint of step (\d+) ", job.log(0))
  return int(found[0]) if found else None


def _check_preempted(stage: _Stage, resumed_from: int | None, signalled_after: int) -> int:
  """Both processes saved the same step, after the signal, and exited 0; -> that step.

  In a multi-process job JAX's preemption service picks the step to stop at
  (the one after the furthest any process reported when the notice spread),
  so it is at or after the signalled step, never before.
  """
  assert stage.returncodes == [0, 0], stage.job.log(0)[-3000:]
  assert _restored_step(stage.job) == resumed_from
  stopped = _stopped_at(stage.job)
  assert len(stopped) == 2 and stopped[0] == stopped[1], stopped
  assert signalled_after <= stopped[0] < NUM_STEPS
  assert stage.job.logged_steps()[-1] == stopped[0]  # no step trained after the one saved
  assert stage.finished[-1] == stopped[0] and not stage.unfinished
  return stopped[0]


@pytest.mark.gloo
def test_sigterm_to_every_process_saves_one_step_and_exits_cleanly(interrupted_job):
  _, stages = interrupted_job
  _check_preempted(stages["sigterm_both"], resumed_from=None, signalled_after=3)


@pytest.mark.gloo
def test_sigterm_to_one_process_stops_both_at_the_same_step(interrupted_job):
  _, stages = interrupted_job
  first_stop = stages["sigterm_both"].finished[-1]
  _check_preempted(stages["sigterm_one"], resumed_from=first_stop, signalled_after=6)


@pytest.mark.gloo
def test_kill_9_leaves_unfinished_checkpoints_that_are_never_restored(interrupted_job):
  _, stages = interrupted_job
  previous = stages["sigterm_one"]
  for name in ("kill_in_save", "kill_at_random", "final"):
    assert _restored_step(stages[name].job) == previous.finished[-1], name  # the last finished
    previous = stages[name]
  assert stages["kill_in_save"].unfinished  # killed inside the save, which stays unfinished
  assert stages["kill_in_save"].finished == stages["sigterm_one"].finished
  assert stages["final"].returncodes == [0, 0] and not stages["final"].unfinished


@pytest.mark.gloo
def test_interrupted_job_ends_equal_to_an_unbroken_one(interrupted_job, unbroken_job):
  workdir, stages = interrupted_job
  assert stages["final"].finished[-1] == NUM_STEPS
  config = _job_config()
  _assert_equal_states(
    *saved_runs.saved_states(workdir, config), *saved_runs.saved_states(unbroken_job, config)
  )


# In-process runs: non-finite steps, unwritable workdirs, a save that fails.


def _smoke(**train_overrides):
  config = digits.get_config("smoke")
  config.train.update(**train_overrides)
  return config


def _poisoned(batch: dict) -> dict:
  return dict(batch, image=np.full_like(batch["image"], np.nan))


def _poison_steps(monkeypatch, steps):
  """The loop's batches of `steps` (counted from 1 in each run) become NaN images."""
  calls = []
  make_global_batch = data.make_global_batch

  def poisoned_at_steps(batch, sharding):
    calls.append(batch)
    return make_global_batch(_poisoned(batch) if len(calls) in steps else batch, sharding)

  monkeypatch.setattr(data, "make_global_batch", poisoned_at_steps)


def test_a_non_finite_step_changes_nothing_but_the_step_counter():
  exp = tasks.build(_smoke(on_nonfinite="skip"))
  mesh = parallel.make_mesh()
  state, shardings = loop.create_state(exp, mesh, seed=0)
  step_fn = loop.compile_train_step(exp, shardings, mesh)
  batches = data.make_train_iterator(exp.data, exp.train.batch_size)
  sharding = parallel.batch_sharding(mesh)
  state, _ = step_fn(state, data.make_global_batch(next(batches), sharding))
  before = jax.device_get(state)
  after, step_metrics = step_fn(state, data.make_global_batch(_poisoned(next(batches)), sharding))
  after = jax.device_get(after)
  assert int(before.step) == 1 and int(after.step) == 2
  _assert_equal_states(after.replace(step=before.step), before)
  scalars = compute_metrics(step_metrics)
  assert scalars["skipped_steps"] == 1 and np.isnan(scalars["loss"])  # a mean over no step
  assert int(step_metrics["skipped_steps"].first) == 2


def test_a_non_finite_step_is_counted_and_not_undone_when_the_run_stops_on_it():
  """train.on_nonfinite="stop": the step spends no selects on undoing it; the loop stops."""
  exp = tasks.build(_smoke())
  mesh = parallel.make_mesh()
  state, shardings = loop.create_state(exp, mesh, seed=0)
  step_fn = loop.compile_train_step(exp, shardings, mesh)
  batch = next(data.make_train_iterator(exp.data, exp.train.batch_size))
  after, step_metrics = step_fn(
    state, data.make_global_batch(_poisoned(batch), parallel.batch_sharding(mesh))
  )
  assert int(after.step) == 1 and int(step_metrics["skipped_steps"].count) == 1
  assert not np.all(np.isfinite(jax.device_get(after.params["conv_in"]["kernel"])))


def test_an_update_to_non_finite_parameters_is_skipped_though_loss_and_gradient_are_finite():
  exp = tasks.build(_smoke(on_nonfinite="skip"))
  mesh = parallel.make_mesh()
  state, _ = loop.create_state(exp, mesh, seed=0)
  fns = dataclasses.replace(exp.step_fns(), tx=optax.sgd(float("nan")))  # NaN updates
  batch = next(data.make_train_iterator(exp.data, exp.train.batch_size))
  before = jax.device_get(state)
  after, step_metrics = jax.jit(functools.partial(diffusion_step.train_step, fns=fns))(state, batch)
  after = jax.device_get(after)
  assert int(after.step) == 1
  _assert_equal_states(after.replace(step=before.step), before)
  scalars = compute_metrics(step_metrics)
  assert scalars["skipped_steps"] == 1 and np.isnan(scalars["loss"])


def test_on_nonfinite_skip_trains_on_and_counts_skipped_steps(tmp_path, monkeypatch):
  logged = []
  compute_metrics = loop.compute_metrics
  monkeypatch.setattr(
    loop, "compute_metrics", lambda m: logged.append(compute_metrics(m)) or logged[-1]
  )
  _poison_steps(monkeypatch, {2})
  config = _smoke(
    num_steps=4, log_every=2, checkpoint_every=1, keep_checkpoints=4, on_nonfinite="skip"
  )
  state = loop.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  assert [scalars["skipped_steps"] for scalars in logged] == [1, 0]
  assert all(np.isfinite(scalars["loss"]) for scalars in logged)  # the means leave step 2 out
  monkeypatch.undo()
  step_1, step_2 = saved_runs.saved_states(tmp_path, config, steps=(1, 2))
  _assert_equal_states(step_2.replace(step=step_1.step), step_1)


@pytest.mark.parametrize(
  "log_every, sample_every",
  [(1, 0), (100, 0), (100, 5)],
  ids=["found_at_log", "found_before_save", "found_before_a_sample_grid"],
)
def test_on_nonfinite_stop_names_the_step_and_saves_or_samples_nothing_after_it(
  tmp_path, monkeypatch, log_every, sample_every
):
  _poison_steps(monkeypatch, {5})
  config = _smoke(num_steps=8, log_every=log_every, checkpoint_every=2, sample_every=sample_every)
  with pytest.raises(FloatingPointError, match=r"at step 5 .* latest checkpoint, step 4,"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert _finished_steps(tmp_path) == [2, 4] and not _unfinished(tmp_path)
  assert not (tmp_path / "samples").exists()  # the grid of step 5 would be of a NaN state


def _without_root_file_access() -> None:
  """Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability bounding set, so the
  program this process execs next obeys file permissions even as root (prctl(2))."""
  libc = ctypes.CDLL(None, use_errno=True)
  pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
  for capability in (cap_dac_override, cap_dac_read_search):
    if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
      raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_workdir_is_one_clear_error_before_training(tmp_path):
  """Run as a launcher that obeys file permissions: CI runs as root, which writes anywhere."""
  workdir = tmp_path / "run"
  workdir.mkdir(mode=0o555)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.train",
      "--config=configs/digits.py:smoke",
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    preexec_fn=_without_root_file_access if os.geteuid() == 0 else None,
  )
  assert result.returncode != 0
  [error] = [line for line in result.stderr.splitlines() if "Cannot write in workdir" in line]
  assert error.startswith(f"launch.train: Cannot write in workdir {workdir}: "), error
  assert "Permission denied" in error
  assert not os.listdir(workdir)


def test_a_workdir_under_a_file_is_one_clear_error_before_training(tmp_path):
  (tmp_path / "file").write_text("")
  workdir = tmp_path / "file" / "run"
  with pytest.raises(OSError, match=f"Cannot write in workdir {re.escape(str(workdir))}: "):
    loop.train_and_evaluate(_smoke(), str(workdir))


@contextlib.contextmanager
def _file_size_limit(max_bytes: int):
  """No file this process writes grows past `max_bytes`: writes fail (EFBIG) as on a full disk."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, not the process
  resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_failing_save_is_named_and_never_restored(tmp_path, digits_smoke_run):
  workdir = saved_runs.copy_run(digits_smoke_run, tmp_path / "run")  # steps 2 and 4 saved
  with (
    _file_size_limit(1 << 17),
    pytest.raises(
      checkpoint.CheckpointError, match=f"Saving a checkpoint in {workdir}/checkpoints failed"
    ),
  ):
    loop.train_and_evaluate(_smoke(num_steps=6), str(workdir))  # its data files: 100-340 kB
  assert _finished_steps(workdir) == [2, 4] and _unfinished(workdir) == ["6.orbax-checkpoint-tmp"]
  state = loop.train_and_evaluate(_smoke(num_steps=6), str(workdir))
  assert int(state.step) == 6
  assert _finished_steps(workdir) == [4, 6] and not _unfinished(workdir)
