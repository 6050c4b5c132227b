"""Runs that survive what clusters do: SIGTERM to one or all processes, kill -9, bad steps, disks.

The multi-process tests start real `launch.train` jobs (2 processes, gloo on
CPU) and continue one workdir through a chain of interruptions; its end state
must equal an unbroken job's bit for bit.
"""

import contextlib
import dataclasses
import datetime
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
from diffusion_jax import data, parallel, train
from diffusion_jax.train import checkpoint, loop, step

import local_jobs  # tests/local_jobs.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The jobs: digits:smoke with one resolution and no attention (fast to trace), a metric line
# per step (the test's clock), and a checkpoint every 4 steps (saves to kill -9 inside).
NUM_STEPS = 48
JOB_FLAGS = ["--config=configs/digits.py:smoke", "--config.model.ch_mult=(1,)",
             "--config.model.attn_resolutions=()", f"--config.train.num_steps={NUM_STEPS}",
             "--config.train.log_every=1", "--config.train.checkpoint_every=4"]
# From SIGTERM to both processes saying they saved (measured 1-3 s on a loaded 2-core CPU), and
# to both gone (3-14 s, most of it the interpreter's exit; the bound only catches a hang).
STOP_SECONDS, EXIT_SECONDS = 10, 60


class _Job:
  """One `launch.train` job over 2 processes on this machine, each logging to a file."""

  def __init__(self, workdir, log_dir, name: str, num_processes: int = 2):
    env = local_jobs.job_env(num_processes, devices_per_process=1)
    self.log_paths = [log_dir / f"{name}.process_{i}.log" for i in range(num_processes)]
    self.processes = []
    for i, log_path in enumerate(self.log_paths):
      with open(log_path, "w") as log:
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *JOB_FLAGS], cwd=REPO,
            env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.DEVNULL, stderr=log))

  def log(self, i: int) -> str:
    return self.log_paths[i].read_text()

  def logged_at(self, i: int, pattern: str) -> float | None:
    """The time (time.time()) of process i's first log line matching `pattern`."""
    for line in self.log(i).splitlines():
      if re.search(pattern, line) and (stamp := re.match(r"[IWEF](\d{4} [\d:.]+) ", line)):
        logged = datetime.datetime.strptime(f"{datetime.date.today().year}{stamp[1]}",
                                            "%Y%m%d %H:%M:%S.%f")
        return logged.timestamp()
    return None

  def last_logged_step(self) -> int:
    return max(map(int, re.findall(r"\] \[(\d+)\] grad_norm", self.log(0))), default=0)

  def wait_for(self, condition, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
      assert time.monotonic() < deadline, self.log(0)[-3000:]
      assert all(p.poll() is None for p in self.processes), self.log(0)[-3000:]
      time.sleep(0.01)

  def send(self, sig, processes=(0, 1)):
    for i in processes:
      self.processes[i].send_signal(sig)

  def wait(self, timeout=300) -> list[int]:
    return [p.wait(timeout) for p in self.processes]


def _finished_steps(workdir) -> list[int]:
  return sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())


def _unfinished(workdir) -> list[str]:
  return [name for name in os.listdir(workdir / "checkpoints") if "tmp" in name]


def _job_config():
  """The config of JOB_FLAGS, to read the jobs' checkpoints here."""
  config = digits.get_config("smoke")
  config.model.update(ch_mult=(1,), attn_resolutions=())
  config.train.update(num_steps=NUM_STEPS, log_every=1, checkpoint_every=4)
  return config


def _saved_states(workdir, config, steps=(None,)) -> list:
  """The checkpoints' full TrainStates (params, EMA, Adam, rng, step) at `steps` (None: the
  latest) as numpy arrays."""
  exp = train.build(config)
  mesh = parallel.make_mesh()
  state, shardings = loop.create_state(exp, mesh, config.seed)
  checkpointer = checkpoint.Checkpointer(str(workdir), every_steps=1, keep=100)
  target = checkpoint.restore_target(state, shardings)
  restored = [jax.device_get(checkpointer.restore(target, step=step)) for step in steps]
  checkpointer.close()
  return restored


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
  signalled_at: float | None  # time.time() of the signal
  seconds: float | None  # from the signal to every process gone
  finished: list[int]  # the finished checkpoints' steps after it
  unfinished: list[str]  # Orbax's temporary directories left after it


def _steps_in(job: _Job, steps: int) -> bool:
  """Whether `job` has logged `steps` steps past the first it logged."""
  logged = re.findall(r"\] \[(\d+)\] grad_norm", job.log(0))
  return len(logged) > steps


def _interrupt(workdir, name, sig, processes=(0, 1), when=lambda job: _steps_in(job, 3),
               delay=0.0):
  """Starts a job on `workdir`, sends `sig` to `processes` `delay` s after `when(job)` holds."""
  job = _Job(workdir, workdir.parent, name)
  job.wait_for(lambda: when(job))
  time.sleep(delay)
  signalled_at = time.time()
  job.send(sig, processes)
  returncodes = job.wait()
  seconds = time.time() - signalled_at
  print(f"{name}: {sig.name} after step {job.last_logged_step()}; processes gone {seconds:.1f} s"
        " later.")
  return _Stage(job, returncodes, signalled_at, seconds, _finished_steps(workdir),
                _unfinished(workdir))


@pytest.fixture(scope="module")
def interrupted_job(tmp_path_factory):
  """One workdir through SIGTERM to both processes, to process 1 only, kill -9 inside a save,
  kill -9 at a random moment, and a last job that runs to the end."""
  workdir = tmp_path_factory.mktemp("interrupted") / "run"
  stages = {"sigterm_both": _interrupt(workdir, "sigterm_both", signal.SIGTERM)}
  stages["sigterm_one"] = _interrupt(workdir, "sigterm_one", signal.SIGTERM, processes=(1,))
  stages["kill_in_save"] = _interrupt(workdir, "kill_in_save", signal.SIGKILL,
                                      when=lambda job: _unfinished(workdir))
  delay = random.uniform(0.0, 2.0)
  print(f"kill_at_random: {delay:.2f} s after the first step.")
  stages["kill_at_random"] = _interrupt(workdir, "kill_at_random", signal.SIGKILL,
                                        when=lambda job: _steps_in(job, 0), delay=delay)
  final = _Job(workdir, workdir.parent, "final")
  stages["final"] = _Stage(final, final.wait(), None, None, _finished_steps(workdir),
                           _unfinished(workdir))
  return workdir, stages


def _stopped_at(job: _Job) -> list[int]:
  """The step each process says it saved and stopped at."""
  return [int(step) for i in range(2)
          for step in re.findall(r"Stop requested \(SIGTERM\): saved step (\d+)", job.log(i))]


def _restored_step(job: _Job) -> int | None:
  found = re.findall(r"Restored checkpoint of step (\d+) ", job.log(0))
  return int(found[0]) if found else None


def _check_preempted(stage: _Stage, resumed_from: int | None) -> int:
  """Both processes saved the same step soon after SIGTERM and exited 0; -> that step."""
  assert stage.returncodes == [0, 0], stage.job.log(0)[-3000:]
  saved_after = [stage.job.logged_at(i, "Stop requested") - stage.signalled_at for i in (0, 1)]
  print(f"{stage.job.log_paths[0].name}: saved {max(saved_after):.1f} s after SIGTERM.")
  assert max(saved_after) < STOP_SECONDS and stage.seconds < EXIT_SECONDS
  assert _restored_step(stage.job) == resumed_from
  stopped = _stopped_at(stage.job)
  assert len(stopped) == 2 and stopped[0] == stopped[1], stopped
  assert (resumed_from or 0) < stopped[0] < NUM_STEPS
  assert stage.finished[-1] == stopped[0] and not stage.unfinished
  return stopped[0]


def test_sigterm_to_every_process_saves_one_step_and_exits_cleanly(interrupted_job):
  _, stages = interrupted_job
  _check_preempted(stages["sigterm_both"], resumed_from=None)


def test_sigterm_to_one_process_stops_both_at_the_same_step(interrupted_job):
  _, stages = interrupted_job
  first_stop = stages["sigterm_both"].finished[-1]
  _check_preempted(stages["sigterm_one"], resumed_from=first_stop)


def test_kill_9_leaves_unfinished_checkpoints_that_are_never_restored(interrupted_job):
  _, stages = interrupted_job
  previous = stages["sigterm_one"]
  for name in ("kill_in_save", "kill_at_random", "final"):
    assert _restored_step(stages[name].job) == previous.finished[-1], name  # the last finished
    previous = stages[name]
  assert stages["kill_in_save"].unfinished  # killed inside the save, which stays unfinished
  assert stages["final"].returncodes == [0, 0] and not stages["final"].unfinished


def test_interrupted_job_ends_equal_to_an_unbroken_one(interrupted_job, unbroken_job):
  workdir, stages = interrupted_job
  assert stages["final"].finished[-1] == NUM_STEPS
  config = _job_config()
  _assert_equal_states(*_saved_states(workdir, config), *_saved_states(unbroken_job, config))


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
  exp = train.build(_smoke())
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
  scalars = train.compute_metrics(step_metrics)
  assert scalars["skipped_steps"] == 1 and np.isnan(scalars["loss"])  # a mean over no step
  assert int(step_metrics["skipped_steps"].first) == 2


def test_an_update_to_non_finite_parameters_is_skipped_though_loss_and_gradient_are_finite():
  exp = train.build(_smoke())
  mesh = parallel.make_mesh()
  state, _ = loop.create_state(exp, mesh, seed=0)
  fns = dataclasses.replace(exp.step_fns(), tx=optax.sgd(float("nan")))  # NaN updates
  batch = next(data.make_train_iterator(exp.data, exp.train.batch_size))
  before = jax.device_get(state)
  after, step_metrics = jax.jit(functools.partial(step.train_step, fns=fns))(state, batch)
  after = jax.device_get(after)
  assert int(after.step) == 1
  _assert_equal_states(after.replace(step=before.step), before)
  scalars = train.compute_metrics(step_metrics)
  assert scalars["skipped_steps"] == 1 and np.isnan(scalars["loss"])


def test_on_nonfinite_skip_trains_on_and_counts_skipped_steps(tmp_path, monkeypatch):
  logged = []
  compute_metrics = loop.compute_metrics
  monkeypatch.setattr(loop, "compute_metrics", lambda m: logged.append(compute_metrics(m)) or
                      logged[-1])
  _poison_steps(monkeypatch, {2})
  config = _smoke(num_steps=4, log_every=2, checkpoint_every=1, keep_checkpoints=4,
                  on_nonfinite="skip")
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  assert [scalars["skipped_steps"] for scalars in logged] == [1, 0]
  assert all(np.isfinite(scalars["loss"]) for scalars in logged)  # the means leave step 2 out
  monkeypatch.undo()
  step_1, step_2 = _saved_states(tmp_path, config, steps=(1, 2))
  _assert_equal_states(step_2.replace(step=step_1.step), step_1)


@pytest.mark.parametrize("log_every", [1, 100], ids=["found_at_log", "found_before_save"])
def test_on_nonfinite_stop_names_the_step_and_saves_nothing_after_it(tmp_path, monkeypatch,
                                                                      log_every):
  _poison_steps(monkeypatch, {5})
  with pytest.raises(FloatingPointError, match=r"at step 5 .* latest checkpoint, step 4,"):
    train.train_and_evaluate(_smoke(num_steps=8, log_every=log_every, checkpoint_every=2),
                             str(tmp_path))
  assert _finished_steps(tmp_path) == [2, 4] and not _unfinished(tmp_path)


@pytest.mark.parametrize("kind", ["read_only", "under_a_file"])
def test_unwritable_workdir_is_one_clear_error_before_training(tmp_path, kind):
  if kind == "read_only":
    if os.geteuid() == 0:
      pytest.skip("root writes in a read-only directory; the 'under_a_file' case holds for root")
    workdir = tmp_path / "run"
    workdir.mkdir(mode=0o555)
  else:
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "run"
  with pytest.raises(OSError, match=f"Cannot write in workdir {re.escape(str(workdir))}: "):
    train.train_and_evaluate(_smoke(), str(workdir))
  if kind == "read_only":
    assert not os.listdir(workdir)


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


def test_a_failing_save_is_named_and_never_restored(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(_smoke(num_steps=2), workdir)
  with _file_size_limit(1 << 20), pytest.raises(
      checkpoint.CheckpointError, match=f"Saving a checkpoint in {tmp_path}/checkpoints failed"):
    train.train_and_evaluate(_smoke(num_steps=4), workdir)  # a 2.8 MB parameter file at step 4
  assert _finished_steps(tmp_path) == [2] and _unfinished(tmp_path) == ["4.orbax-checkpoint-tmp"]
  state = train.train_and_evaluate(_smoke(num_steps=4), workdir)
  assert int(state.step) == 4
  assert _finished_steps(tmp_path) == [2, 4] and not _unfinished(tmp_path)
