"""Sampling throughput of each sampler on a zoo U-Net, against the bare network.

    python -m benchmarks.sample_throughput                       # tiny CPU-sized model
    python -m benchmarks.sample_throughput --model=ddpm_cifar10 --ch=0 --batch_size=256 \
        --steps=50

Prints, per sampler: compile time, images/s, ms per model call, and the
sampler's overhead over `steps` bare forward passes (noise, update, loop).
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from diffusion_jax import models, sampling, schedules
from diffusion_jax.diffusion import ModelSpec

_MODEL = flags.DEFINE_string("model", "ddpm_cifar10", "Zoo entry.")
_CH = flags.DEFINE_integer("ch", 32, "Base channels override (CPU-sized); 0 keeps the entry's.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per batch.")
_STEPS = flags.DEFINE_integer("steps", 10, "Model calls per image.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the best is reported.")


def best_time(fn, *args) -> tuple[float, float]:
  """(first call incl. compile, best of the timed calls) in seconds."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, min(times)


def main(argv):
  del argv
  model = models.get_model(_MODEL.value, **({"ch": _CH.value} if _CH.value else {}))
  entry = models.lookup(_MODEL.value)
  shape = (_BATCH_SIZE.value, *entry.input_shape)
  spec = ModelSpec(var_type="learned_range" if model.learn_sigma else "fixed_small")
  schedule = schedules.get_schedule("linear", 1000)
  x, t = jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), x, t)
  apply_fn = lambda params, x, t, y: model.apply(params, x, t, y)

  _, forward = best_time(jax.jit(apply_fn), params, x, t, None)
  print(f"{_MODEL.value} ch={model.ch} batch={shape} on {jax.devices()[0].platform}: "
        f"{forward * 1e3:.1f} ms per forward pass")
  print(f"{'sampler':<22}{'compile s':>10}{'images/s':>10}{'ms/call':>9}{'overhead':>10}")
  runs = [(name, sampling.SamplerConfig(name, _STEPS.value)) for name in sampling.SAMPLERS]
  if model.num_classes:
    runs.append(("ddim + guidance", sampling.SamplerConfig("ddim", _STEPS.value,
                                                           guidance_scale=1.0)))
  for name, config in runs:
    sample_batch = jax.jit(sampling.make_batch_sampler(
        config, apply_fn, spec, schedule, entry.input_shape, shape[0],
        num_classes=model.num_classes))
    first, best = best_time(sample_batch, params, jax.random.key(1))
    per_call = best / _STEPS.value
    print(f"{name:<22}{first - best:>10.1f}{shape[0] / best:>10.1f}{per_call * 1e3:>9.1f}"
          f"{per_call / forward - 1:>10.1%}")


if __name__ == "__main__":
  app.run(main)
