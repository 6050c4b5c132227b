"""Seconds from a config to a compiled train step: what every fresh training process pays.

    python -m benchmarks.compile_time                          # configs/digits.py:smoke
    python -m benchmarks.compile_time --config=configs/digits.py:smoke \
        --config.model.ch_mult="(1, 2)" --config.model.attn_resolutions="(4,)"

Four phases of `train.loop`'s start, each timed once, with JAX's persistent
compilation cache off (a multi-process job's processes run without it, and a
test run starts cold): `create_state` (tracing and compiling the jitted
`init_state`, then running it), tracing the train step, lowering it to
StableHLO, and XLA's compile. Tests start such processes dozens of times, so
these seconds, not the steps, are most of their time.
"""

import time

import jax
from absl import app
from ml_collections import config_flags

from diffusion_jax import data, parallel
from diffusion_jax.train import loop, tasks

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/digits.py:smoke", "The training config whose step is compiled."
)


def _timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def main(argv):
  del argv
  jax.config.update("jax_enable_compilation_cache", False)
  config = _CONFIG.value
  exp = tasks.build(config)
  mesh = parallel.make_mesh()
  (state, shardings), create_s = _timed(lambda: loop.create_state(exp, mesh, config.seed))
  batch = data.make_global_batch(next(exp.make_train_iterator()), parallel.batch_sharding(mesh))
  step = loop.compile_train_step(exp, shardings, mesh)
  traced, trace_s = _timed(lambda: step.trace(state, batch))
  lowered, lower_s = _timed(traced.lower)
  _, compile_s = _timed(lowered.compile)
  print(
    f"{len(jax.devices())} {jax.devices()[0].platform} devices: create_state {create_s:.1f} s,"
    f" trace {trace_s:.1f} s, lower {lower_s:.1f} s, compile {compile_s:.1f} s,"
    f" total {create_s + trace_s + lower_s + compile_s:.1f} s"
  )


if __name__ == "__main__":
  app.run(main)
