"""One prepared command for the day an accelerator is at hand: our speed on it, in a few minutes.

    python -m benchmarks.accelerator --out=accelerator.json    # whatever JAX sees: GPU, TPU, CPU
    python -m benchmarks.accelerator --tiny                    # CPU-sized, seconds (a test)

On all local devices (the batch split over them, as launch.train does):
- train: the real train step (`loop.compile_train_step`) of ddpm_cifar10 at
  batch 128 (the DDPM paper's) in float32 and bfloat16, and
  adm_imagenet64_cond in bfloat16: compile seconds, images/s, TFLOP/s per
  device and MFU (`perf`: XLA's FLOPs of the step), XLA's memory per device;
- sample: DDIM, DPM-Solver++ and EDM-Heun on ddpm_cifar10 in bfloat16
  (random weights), images/s and MFU (one network call's FLOPs times the calls);
- inception: FID Inception pool features of uint8 32x32 images (random
  weights), images/s and MFU;
- largest batch: the largest ddpm_cifar10 train batch whose compiled step
  fits a device's memory, bfloat16 with and without remat, found by
  bisection on `lower().compile().memory_analysis()` (nothing runs).

Peaks are the data sheets' (`perf.PEAK_FLOPS`); where JAX's device_kind has
none (a CPU) a matmul probe's FLOP/s stands in, labelled so. Prints a table
and writes every number to --out as one JSON object. --tiny shrinks every
U-Net (32 channels, one level of one block, 8x8 images), batches (8) and step
counts, and each largest-batch search to one compile (batch 8 within 64 MiB):
every row of the table in seconds, so a suite test runs it. diffusers' numbers on the same
accelerator are not measured here: benchmarks.train_throughput and
sample_throughput run the PyTorch peer on CPU only; the JSON says so.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.train_throughput import benchmark_config
from diffusion_jax import files, models, parallel, perf, runs, sampling
from diffusion_jax.evaluation import inception
from diffusion_jax.train import diffusion_task, loop

_TINY = flags.DEFINE_bool("tiny", False, "CPU-sized networks, batches, steps and searches.")
_OUT = flags.DEFINE_string("out", None, "Write the results to this JSON file too.")
_STEPS = flags.DEFINE_integer("train_steps", 10, "Timed train steps per case (after one warm-up).")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 20, "Sampler steps (EDM-Heun: noise levels).")
_SEARCH_S = flags.DEFINE_float("search_s", 150.0, "Seconds of compiles per largest-batch search.")
_MEMORY_GIB = flags.DEFINE_float(
  "memory_gib",
  0.0,
  "Per-device memory the largest-batch search fits into; 0: the device's"
  " bytes_limit (64 MiB with --tiny, 16 GiB on a device that reports none).",
)

TRAIN_CASES = (
  ("ddpm_cifar10", "float32"),
  ("ddpm_cifar10", "bfloat16"),
  ("adm_imagenet64_cond", "bfloat16"),
)
SAMPLERS = ("ddim", "dpm_solver", "edm_heun")
# --tiny: every zoo U-Net at 32 channels, one level of one block, attention at 8x8, 8x8 images:
# each network compiles in seconds on a CPU.
TINY_UNET = {"ch": 32, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": (8,)}
TINY_SIDE = 8


def _sizes() -> dict[str, int]:
  """Batch sizes and counts: the paper's batch on an accelerator, CPU-sized with --tiny."""
  if _TINY.value:
    return dict(
      train_batch=8,
      sample_batch=8,
      inception_batch=8,
      steps=2,
      sample_steps=2,
      search_from=8,
      search_to=8,
    )
  return dict(
    train_batch=128,
    sample_batch=128,
    inception_batch=256,
    steps=_STEPS.value,
    sample_steps=_SAMPLE_STEPS.value,
    search_from=128,
    search_to=1 << 16,
  )


def _experiment(name: str, dtype: str, batch_size: int, **fields) -> diffusion_task.Experiment:
  """The benchmark's training experiment of zoo entry `name` in `dtype` (--tiny: shrunk)."""
  overrides = {"dtype": dtype, **fields}
  side = models.lookup(name).input_shape[0]
  if _TINY.value:
    overrides |= TINY_UNET | ({"num_head_channels": 16} if name.startswith("adm") else {})
    side = TINY_SIDE
  shape = (side, side, models.lookup(name).input_shape[2])
  return diffusion_task.build(benchmark_config(name, overrides, shape, batch_size))


_PROBES: dict[str, float] = {}


def peak(dtype: Any) -> tuple[float, str]:
  """(peak FLOP/s per device, its source): the data sheet's, else a matmul probe's (measured once)."""
  data_sheet = perf.peak_flops(jax.devices()[0].device_kind, dtype)
  if data_sheet:
    return data_sheet, "data sheet"
  name = jnp.dtype(dtype).name
  if name not in _PROBES:
    _PROBES[name] = perf.probe_peak_flops(dtype)
  return _PROBES[name], "matmul probe"


def _timed(fn) -> tuple[Any, float]:
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def _row(
  kind: str,
  name: str,
  dtype: str,
  batch: int,
  runs_: int,
  seconds: float,
  flops: float,
  compile_s: float,
  memory: int | None = None,
) -> dict:
  """One measured case: throughput (`perf.rates`, MFU against `peak(dtype)`), compile, memory."""
  peak_flops, source = peak(dtype)
  return dict(
    kind=kind,
    name=name,
    dtype=dtype,
    batch=batch,
    compile_s=compile_s,
    flops_per_run=flops,
    peak_flops=peak_flops,
    peak_source=source,
    memory_gib=None if memory is None else memory / 2**30,
    **perf.rates(runs_, seconds, flops, batch, peak_flops),
  )


def _random_batch(exp, batch_size: int, mesh) -> dict:
  x = np.random.default_rng(0).uniform(-1, 1, (batch_size, *exp.image_shape))
  return jax.device_put(
    {"image": jnp.asarray(x, jnp.float32), "label": jnp.zeros((batch_size,), jnp.int32)},
    parallel.batch_sharding(mesh),
  )


def train_case(name: str, dtype: str, batch_size: int, steps: int) -> dict:
  """The train step's compile seconds and throughput: one warm-up step, then `steps` timed."""
  exp = _experiment(name, dtype, batch_size)
  mesh = parallel.make_mesh()
  state, shardings = loop.create_state(exp, mesh, seed=0)
  batch = _random_batch(exp, batch_size, mesh)
  compiled, compile_s = _timed(
    lambda: loop.compile_train_step(exp, shardings, mesh).lower(state, batch).compile()
  )
  flops = loop.step_flops(exp, compiled, state, batch, mesh)
  state = jax.block_until_ready(compiled(state, batch)[0])

  def run():
    nonlocal state
    for _ in range(steps):
      state, _ = compiled(state, batch)
    return jax.block_until_ready(state)

  _, seconds = _timed(run)
  return _row(
    "train",
    name,
    dtype,
    batch_size,
    steps,
    seconds,
    flops,
    compile_s,
    perf.compiled_memory_bytes(compiled),
  )


def sample_cases(batch_size: int, steps: int) -> list[dict]:
  """Each sampler on ddpm_cifar10 in bfloat16: compile seconds, then the second batch timed."""
  exp = _experiment("ddpm_cifar10", "bfloat16", batch_size)
  mesh = parallel.make_mesh()
  params = jax.jit(exp.init_state)(jax.random.key(0)).params
  model = runs.ema_model(exp.config, params, 0, exp.model)
  forward = runs.forward_flops(model, batch_size, mesh.size)
  rows = []
  for sampler in SAMPLERS:
    config = sampling.SamplerConfig(sampler, steps)
    fn = jax.jit(
      sampling.make_batch_sampler(
        config, model.apply_fn, model.spec, model.schedule, model.image_shape, batch_size
      ),
      out_shardings=parallel.batch_sharding(mesh),
      compiler_options=parallel.compiler_options(mesh),
    )
    key = jax.random.key(1)
    compiled, compile_s = _timed(lambda: fn.lower(params, key).compile())
    jax.block_until_ready(compiled(params, key))
    _, seconds = _timed(lambda: jax.block_until_ready(compiled(params, key)))
    rows.append(
      _row(
        "sample",
        f"ddpm_cifar10 {sampler} x{config.nfe(model.schedule.num_timesteps)}",
        "bfloat16",
        batch_size,
        1,
        seconds,
        forward * config.nfe(model.schedule.num_timesteps),
        compile_s,
      )
    )
  return rows


def inception_case(batch_size: int) -> dict:
  """FID Inception features of uint8 32x32 images (resized to 299), random weights."""
  mesh = parallel.make_mesh()
  images = jax.device_put(
    np.random.default_rng(0).integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
    parallel.batch_sharding(mesh),
  )
  variables = random_like(
    jax.eval_shape(
      inception.InceptionV3().init, jax.random.key(0), inception.preprocess(images[:1], "tf")
    )
  )
  fn = jax.jit(inception.apply_inception, compiler_options=parallel.compiler_options(mesh))
  compiled, compile_s = _timed(lambda: fn.lower(variables, images).compile())
  jax.block_until_ready(compiled(variables, images))
  _, seconds = _timed(lambda: jax.block_until_ready(compiled(variables, images)))
  return _row(
    "inception",
    "FID Inception 32->299",
    "float32",
    batch_size,
    1,
    seconds,
    perf.compiled_flops(compiled),
    compile_s,
    perf.compiled_memory_bytes(compiled),
  )


def random_like(abstract: Any) -> Any:
  """Uniform [0.5, 1.5) arrays of `abstract`'s shapes (positive: batch-norm variances too).

  Made on the host: jitting the Inception's init costs a CPU minutes of compile.
  """
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), abstract)


def memory_limit() -> int:
  """Bytes per device the largest-batch search fits into (see --memory_gib)."""
  if _MEMORY_GIB.value:
    return int(_MEMORY_GIB.value * 2**30)
  if _TINY.value:
    return 64 * 2**20
  return int((jax.devices()[0].memory_stats() or {}).get("bytes_limit", 16 * 2**30))


def step_memory(name: str, dtype: str, batch_size: int, remat: bool) -> int:
  """XLA's bytes per device for the compiled train step at `batch_size`: compiled, never run."""
  exp = _experiment(name, dtype, batch_size, remat=remat)
  mesh = parallel.make_mesh()
  abstract = jax.eval_shape(exp.init_state, jax.random.key(0))
  shardings = parallel.state_shardings(mesh, abstract)
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  batch_sharding = parallel.batch_sharding(mesh)
  batch = {
    "image": jax.ShapeDtypeStruct(
      (batch_size, *exp.image_shape), jnp.float32, sharding=batch_sharding
    ),
    "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding),
  }
  compiled = loop.compile_train_step(exp, shardings, mesh).lower(state, batch).compile()
  return perf.compiled_memory_bytes(compiled)


def batch_search(sizes: dict[str, int]) -> list[dict]:
  """The largest ddpm_cifar10 bfloat16 train batch that fits, without and with remat."""
  limit, granule = memory_limit(), jax.device_count()
  rows = []
  for remat in (False, True):
    tried = {}

    def fits(batch_size, remat=remat, tried=tried):
      tried[batch_size] = step_memory("ddpm_cifar10", "bfloat16", batch_size, remat)
      return tried[batch_size] <= limit

    began = time.perf_counter()
    found, finished = perf.largest_batch(
      fits,
      sizes["search_from"],
      granule,
      deadline=began + _SEARCH_S.value,
      max_batch=sizes["search_to"],
    )
    seconds = time.perf_counter() - began
    rows.append(
      dict(
        kind="largest_batch",
        name="ddpm_cifar10",
        dtype="bfloat16",
        remat=remat,
        limit_gib=limit / 2**30,
        largest_batch=found,
        finished=finished,
        search_s=seconds,
        tried_gib={b: m / 2**30 for b, m in sorted(tried.items())},
      )
    )
  return rows


def print_table(result: dict) -> None:
  device = result["device"]
  print(
    f"{device['count']} x {device['kind']} ({device['platform']}), JAX {result['jax']}"
    f"{', tiny' if result['tiny'] else ''}"
  )
  print(
    f"{'case':<40}{'dtype':>9}{'batch':>7}{'compile s':>10}{'images/s':>10}"
    f"{'TFLOP/s/dev':>12}{'MFU':>7}{'GiB/dev':>8}  peak from"
  )
  for row in result["rows"]:
    if row["kind"] == "largest_batch":
      continue
    memory = "-" if row["memory_gib"] is None else f"{row['memory_gib']:.2f}"
    print(
      f"{row['kind'] + ' ' + row['name']:<40}{row['dtype']:>9}{row['batch']:>7}"
      f"{row['compile_s']:>10.1f}{row['images_per_sec']:>10.1f}"
      f"{row['tflops_per_device']:>12.3f}{row['mfu']:>7.1%}{memory:>8}  {row['peak_source']}"
    )
  for row in result["rows"]:
    if row["kind"] == "largest_batch":
      print(
        f"largest {row['name']} {row['dtype']} train batch{' with remat' if row['remat'] else ''}"
        f" within {row['limit_gib']:.2f} GiB per device: {row['largest_batch']}"
        f"{'' if row['finished'] else ' or more (out of time)'}"
        f" ({row['search_s']:.0f} s of compiles)"
      )
  print(f"diffusers: {result['diffusers']}")


def _logged(label: str, fn):
  """fn(), printing how long it took (each part compiles; a slow one shows where the time went)."""
  result, seconds = _timed(fn)
  print(f"[{label}: {seconds:.1f} s]", flush=True)
  return result


def main(argv):
  del argv
  sizes = _sizes()
  rows = [
    _logged(
      f"train {name} {dtype}",
      lambda name=name, dtype=dtype: train_case(name, dtype, sizes["train_batch"], sizes["steps"]),
    )
    for name, dtype in TRAIN_CASES
  ]
  rows += _logged("samplers", lambda: sample_cases(sizes["sample_batch"], sizes["sample_steps"]))
  rows.append(_logged("inception", lambda: inception_case(sizes["inception_batch"])))
  rows += _logged("largest batch", lambda: batch_search(sizes))
  device = jax.devices()[0]
  result = dict(
    jax=jax.__version__,
    tiny=_TINY.value,
    rows=rows,
    device=dict(kind=device.device_kind, platform=device.platform, count=jax.device_count()),
    peak_memory_gib=perf.max_peak_memory_gib(),
    diffusers="not run on the accelerator (benchmarks.train_throughput / sample_throughput"
    " run the PyTorch peer on CPU)",
  )
  print_table(result)
  if _OUT.value:
    files.write_json(_OUT.value, result, indent=1)


if __name__ == "__main__":
  app.run(main)
