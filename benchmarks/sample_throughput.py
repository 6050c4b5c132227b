"""Sampling throughput of each sampler on a zoo U-Net, against diffusers' pipelines.

    python -m benchmarks.sample_throughput                       # tiny CPU-sized model
    python -m benchmarks.sample_throughput --model=ddpm_cifar10 --ch=0 --batch_size=256 \
        --steps=50

Prints, per sampler: compile time, images/s, seconds per image, ms per model
call, and the sampler's overhead over `steps` bare forward passes (noise,
update, loop). For `ddpm_*` entries the same run times diffusers' DDPMPipeline
and DDIMPipeline (PyTorch) on a UNet2DModel of the same shape and prints the
ratio ours / theirs (`pip install -e ".[bench]"`).
"""

import functools
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import peers
from diffusion_jax import models, parallel, sampling, schedules
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


def time_diffusers(torch, model, image_shape, batch_size, steps) -> dict[str, float]:
  """Best seconds per batch of diffusers' DDPM and DDIM pipelines on the twin UNet2DModel."""
  import diffusers  # noqa: PLC0415  (optional peer: the `bench` extra)

  unet = peers.diffusers_unet(model, image_shape[0], image_shape[2]).eval()
  pipelines = {
    "ddpm": diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler(1000, beta_schedule="linear")),
    "ddim": diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler(1000, beta_schedule="linear")),
  }
  times = {}
  with torch.inference_mode():
    for name, pipeline in pipelines.items():
      pipeline.set_progress_bar_config(disable=True)
      run = lambda: pipeline(batch_size=batch_size, num_inference_steps=steps, output_type="np")
      times[name] = best_time(run)[1]
  return times


def main(argv):
  del argv
  fields = {**models.lookup(_MODEL.value).kwargs, **({"ch": _CH.value} if _CH.value else {})}
  model = models.get_model(_MODEL.value, **fields)
  entry = models.lookup(_MODEL.value)
  shape = (_BATCH_SIZE.value, *entry.input_shape)
  spec = ModelSpec(var_type="learned_range" if model.learn_sigma else "fixed_small")
  schedule = schedules.get_schedule("linear", 1000)
  x, t = jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), x, t)
  apply_fn = lambda params, x, t, y: model.apply(params, x, t, y)
  jit = functools.partial(jax.jit, compiler_options=parallel.compiler_options(parallel.make_mesh()))

  _, forward = best_time(jit(apply_fn), params, x, t, None)
  print(
    f"{_MODEL.value} ch={model.ch} batch={shape} steps={_STEPS.value} on "
    f"{jax.devices()[0].platform}: {forward * 1e3:.1f} ms per forward pass"
  )
  header = f"{'sampler':<24}{'compile s':>10}{'images/s':>10}{'s/image':>9}{'ms/call':>9}"
  print(header + f"{'overhead':>10}")
  runs = [
    (name, sampling.SamplerConfig(name, _STEPS.value))
    for name in sampling.SAMPLERS
    if name != "consistency"
  ]  # it samples consistency-trained networks only
  if model.num_classes:
    runs.append(
      ("ddim + guidance", sampling.SamplerConfig("ddim", _STEPS.value, guidance_scale=1.0))
    )
  ours = {}
  for name, config in runs:
    sample_batch = jit(
      sampling.make_batch_sampler(
        config, apply_fn, spec, schedule, entry.input_shape, shape[0], num_classes=model.num_classes
      )
    )
    first, best = best_time(sample_batch, params, jax.random.key(1))
    ours[name] = best
    per_call = best / _STEPS.value
    print(
      f"{name:<24}{first - best:>10.1f}{shape[0] / best:>10.2f}{best / shape[0]:>9.3f}"
      f"{per_call * 1e3:>9.1f}{per_call / forward - 1:>10.1%}"
    )
  torch, why_not = peers.import_peer()
  if model.learn_sigma:
    why_not = "diffusers' DDIM pipeline takes epsilon-only models"
  if why_not is None:
    try:
      theirs = time_diffusers(torch, model, entry.input_shape, shape[0], _STEPS.value)
    except ValueError as e:
      why_not = str(e)
  if why_not is not None:
    print(f"No PyTorch rows: {why_not}.")
    return
  for name, best in theirs.items():
    label = f"diffusers {name.upper()}Pipeline"
    print(
      f"{label:<24}{'-':>10}{shape[0] / best:>10.2f}{best / shape[0]:>9.3f}"
      f"{best / _STEPS.value * 1e3:>9.1f}   ours/theirs images/s: {best / ours[name]:.2f}x"
    )


if __name__ == "__main__":
  app.run(main)
