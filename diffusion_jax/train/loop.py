"""The task-neutral training loop: restore or init, step, log, run the task's hooks, checkpoint,
stop cleanly on SIGTERM.

    state = loop.train_and_evaluate(config, workdir)  # resumes from workdir's latest checkpoint

The config's task (train/tasks.py) builds the state, the step, the batches and
the periodic hooks; the loop knows nothing else of it.
"""

from __future__ import annotations

import contextlib
import datetime
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview

from diffusion_jax import checkpoint, data, files, parallel, perf, summaries
from diffusion_jax.train import run_config, task, tasks
from diffusion_jax.train.state import TrainMetrics, TrainState, compute_metrics, merge_metrics

PROFILE_DIR = "profile"  # WORKDIR/profile/: train.profile_steps' trace (perf.StepTrace)


def compile_train_step(exp, state_shardings, mesh, compiler_options: dict[str, str] | None = None):
  """jit of the experiment's train step: state shardings kept, batch over "data", old state donated.

  `compiler_options` (XLA's) default to `parallel.compiler_options(mesh)`.
  """
  if compiler_options is None:
    compiler_options = parallel.compiler_options(mesh)
  return jax.jit(
    exp.train_step_fn(),
    in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
    out_shardings=(state_shardings, parallel.replicated(mesh)),
    donate_argnums=0,
    compiler_options=compiler_options,
  )


def check_batch_fits(batch_size: int, mesh) -> None:
  """The global batch must split evenly over the mesh's data axis; else a ValueError naming it."""
  devices = mesh.shape[parallel.DATA_AXIS]
  if batch_size % devices:
    raise ValueError(
      f"train.batch_size={batch_size} must be a multiple of the {devices} devices"
      " of the mesh's data axis (all devices / train.model_parallelism)."
    )


def step_flops(exp, compiled, state, batch, mesh) -> float:
  """Model FLOPs of one train step on one device (XLA's cost analysis).

  The compiled step's own count, or, where the task says it is off
  (`counted_step_fn`: a microbatch scan, remat), that of the task's counted
  step, lowered but not compiled (a whole-program count, split over the mesh).
  """
  counted = exp.counted_step_fn()
  if counted is None:
    return perf.compiled_flops(compiled)
  return perf.lowered_flops(jax.jit(counted).lower(state, batch), mesh.size)


def start_meter(exp, compiled, state, batch, mesh, step: int) -> perf.Meter:
  """The loop's throughput meter from `step` on: FLOPs per step, images per step, the peak.

  The peak is `perf.peak_flops` of the first device in the model's compute
  dtype (`model.dtype`, float32 if it has none): unknown on a CPU, so no MFU there.
  """
  dtype = getattr(exp.model, "dtype", jnp.float32)
  return perf.Meter(
    step_flops(exp, compiled, state, batch, mesh),
    exp.train.batch_size,
    perf.peak_flops(jax.devices()[0].device_kind, dtype),
    last_step=step,
  )


def perf_scalars(meter: perf.Meter, step: int, num_steps: int, first: bool) -> dict[str, float]:
  """perf/* scalars of the window ending at `step`; the first log adds the peak memory (GiB).

  Logs them with the time left to `num_steps` at this window's rate (hooks and
  saves left out, as they are of the rate).
  """
  values = meter.read(step)
  left = datetime.timedelta(seconds=round((num_steps - step) / values["steps_per_sec"]))
  logging.info("Step %d of %d: %s; ETA %s.", step, num_steps, perf.format_rates(values), left)
  if first and (peak_memory := perf.max_peak_memory_gib()) is not None:
    logging.info("Peak memory in use: %.2f GiB on the fullest local device.", peak_memory)
    values["peak_memory_gib"] = peak_memory
  return {f"perf/{name}": value for name, value in values.items()}


def create_state(exp, mesh, seed: int):
  """-> (the initial state, created directly in its shardings, and those shardings)."""
  rng = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(exp.init_state, rng)
  shardings = parallel.state_shardings(mesh, abstract)
  return jax.jit(exp.init_state, out_shardings=shardings)(rng), shardings


def make_writer(workdir: str) -> summaries.LoggedWriter:
  """Metrics to the log on every process, and to TensorBoard in `workdir` from process 0.

  The event files go through the path layer (`summaries.EventWriter`), not
  TensorFlow's GCS client: see the trade-off of its flushes there.
  """
  return summaries.LoggedWriter(workdir if jax.process_index() == 0 else None)


def run_hook(hook: task.Hook, state: TrainState, step: int, writer: summaries.LoggedWriter) -> None:
  """Runs a due periodic hook and logs how long it took."""
  start = time.perf_counter()
  hook.run(state, step, writer)
  logging.info("%s at step %d took %.1f s.", hook.name, step, time.perf_counter() - start)


def _finite(scalars: dict) -> dict:
  """The logged values but NaNs: the means of empty timestep quarters, or of skipped steps only."""
  return {k: v for k, v in scalars.items() if np.isfinite(v)}


def _raise_if_skipped(accumulated: TrainMetrics | None, latest_checkpoint: int | None) -> None:
  """train.on_nonfinite="stop": raises naming the first non-finite step since the metrics were reset.

  Reads two device scalars: called at log steps, before periodic hooks and
  before saves only, so that no state past a non-finite step (which the train
  step does not undo in this mode) is ever saved or sampled.
  """
  if accumulated is None:
    return
  skipped = jax.device_get(accumulated["skipped_steps"])
  if skipped.count:
    raise FloatingPointError(
      f"Non-finite loss, gradient or update at step {int(skipped.first)} ({int(skipped.count)} such"
      f" step(s) since the last log); stopping (train.on_nonfinite='stop'). The latest"
      f" checkpoint, step {latest_checkpoint}, is from before it; train.on_nonfinite='skip'"
      " skips such steps instead."
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, model: nn.Module | None = None
) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state.

  The config's `task` (`tasks.TASKS`: diffusion by default, or segmentation)
  builds the experiment, a `task.Task`; the loop is the same for every task. `model`, an already
  built Flax module, replaces `config.model` (for diffusion one taking (x, t,
  y=None, train=False)). Sampling the run later (launch.sample) rebuilds the
  model from config.model: name a factory there ("package.module:factory") to
  make that possible.
  """
  exp = tasks.build(config, model)
  mesh = parallel.make_mesh(exp.train.model_parallelism)
  check_batch_fits(exp.train.batch_size, mesh)
  checkpoint.check_writable(workdir)
  checkpointer = checkpoint.Checkpointer(
    workdir,
    every_steps=exp.train.checkpoint_every,
    keep=exp.train.keep_checkpoints,
    delete_unfinished=True,
  )
  config_changes = run_config.check_resume(
    config,
    workdir,
    checkpointer,  # before any write
    exp.resume_rules,
  )
  data_iterator = exp.make_train_iterator()
  state, shardings = create_state(exp, mesh, config.seed)
  state = checkpointer.restore(checkpoint.restore_target(state, shardings), data_iterator) or state
  initial_step = int(state.step)
  run_config.record_resume(config, workdir, config_changes, initial_step)
  writer = make_writer(workdir)
  if initial_step == 0:
    parameter_overview.log_parameter_overview(state.params)
  logging.info(
    "Training %s for %d steps from step %d on %d devices (%s).",
    type(exp.model).__name__,
    exp.train.num_steps,
    initial_step,
    jax.device_count(),
    dict(mesh.shape),
  )
  step_fn = compile_train_step(exp, shardings, mesh)
  hooks = exp.periodic_hooks(mesh, workdir)
  batch_sharding = parallel.batch_sharding(mesh)
  accumulated, compiled, meter = None, None, None
  stop_on_nonfinite = exp.train.on_nonfinite == "stop"
  trace = perf.StepTrace(exp.train.profile_range, files.join(workdir, PROFILE_DIR))
  with (
    checkpoint.PreemptionNotice(initial_step) as preemption,
    contextlib.closing(checkpointer),
    contextlib.closing(writer),
    contextlib.closing(trace),
  ):
    for step in range(initial_step + 1, exp.train.num_steps + 1):
      batch = data.make_global_batch(next(data_iterator), batch_sharding)
      if compiled is None:
        compiled = step_fn.lower(state, batch).compile()
        meter = start_meter(exp, compiled, state, batch, mesh, step - 1)
      with trace.around(step):
        state, step_metrics = compiled(state, batch)
      trace.after(step, state)
      accumulated = merge_metrics(accumulated, step_metrics)
      last = step == exp.train.num_steps
      if step % exp.train.log_every == 0 or last:
        scalars = compute_metrics(accumulated)  # the loop's host sync (and before saves)
        if stop_on_nonfinite:
          _raise_if_skipped(accumulated, checkpointer.latest_step())
        first_log = meter.last_step == initial_step
        rates = perf_scalars(meter, step, exp.train.num_steps, first_log)
        writer.write_scalars(step, _finite(scalars) | rates)
        accumulated = None
      due = [hook for hook in hooks if hook.due(step, last)]
      if due and stop_on_nonfinite:  # no state past a non-finite step is sampled
        _raise_if_skipped(accumulated, checkpointer.latest_step())
      for hook in due:
        with meter.excluded():
          run_hook(hook, state, step, writer)
      stop = preemption.reached(step)
      if stop or last or checkpointer.is_due(step):
        if stop_on_nonfinite:
          _raise_if_skipped(accumulated, checkpointer.latest_step())
        with meter.excluded():
          checkpointer.save(step, state, data_iterator, force=True)
      if stop:
        logging.warning("Stop requested (SIGTERM): saved step %d and stopping.", step)
        break
  return state
