"""Draws samples from a trained model's EMA parameters into .npz files and a PNG grid.

    python -m launch.sample --workdir=workdirs/digits --num_samples=50000 --sampler=ddim --steps=50
    python -m launch.sample --workdir=workdirs/imagenet64 --sampler=dpm_solver --steps=20 \
        --guidance=1.5 --output=/tmp/samples

Writes OUTPUT/batch_*.npz as batches finish, then OUTPUT/samples.npz ('arr_0':
uint8 NHWC, what FID tools read) and OUTPUT/grid.png; OUTPUT defaults to
WORKDIR/samples/step<checkpoint>-<sampler settings>. Rerunning the same command
resumes after the last finished batch, with the same result as one run; an
OUTPUT holding another checkpoint's or sampler's batches is refused.
The batch is split over all local devices; one host only.
"""

import dataclasses
import functools
import os

import jax
from absl import app, flags

from diffusion_jax import parallel, sampling
from diffusion_jax.train.inference import load_ema_for_sampling
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding the checkpoints.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 50_000, "Images to draw.")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", sorted(sampling.SAMPLERS), "The sampler.")
_STEPS = flags.DEFINE_integer("steps", 50, "Model calls per image; 0 = all T training steps.")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM's noise scale, 0 = deterministic (ddim only).")
_GUIDANCE = flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance scale w; 0 = none.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per batch, over all devices.")
_SEED = flags.DEFINE_integer("seed", 0, "Batch b is drawn with fold_in(key(seed), b).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to sample; default the latest.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory; default WORKDIR/samples/<settings>.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  common.start(argv)
  if jax.process_count() > 1:
    raise app.UsageError("launch.sample runs on one host; start one job per host instead.")
  if _BATCH_SIZE.value % jax.device_count():
    raise app.UsageError(f"--batch_size={_BATCH_SIZE.value} must be a multiple of the"
                         f" {jax.device_count()} devices.")
  config = sampling.SamplerConfig(_SAMPLER.value, _STEPS.value or None, _ETA.value,
                                  _GUIDANCE.value)
  model = load_ema_for_sampling(_WORKDIR.value, _STEP.value)
  mesh = parallel.make_mesh()
  sample_batch = jax.jit(
      sampling.make_batch_sampler(config, model.apply_fn, model.spec, model.schedule,
                                  model.image_shape, _BATCH_SIZE.value,
                                  num_classes=model.num_classes),
      out_shardings=parallel.batch_sharding(mesh), compiler_options=parallel.compiler_options(mesh))
  name = (f"step{model.step}-{config.sampler}-{config.steps or 'all'}steps-eta{config.eta:g}"
          f"-w{config.guidance_scale:g}-seed{_SEED.value}")
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, "samples", name)
  sampling.sample_to_files(
      functools.partial(sample_batch, model.params), _NUM_SAMPLES.value, _BATCH_SIZE.value, output,
      key=jax.random.key(_SEED.value),
      settings={"workdir": os.path.abspath(_WORKDIR.value), "checkpoint_step": model.step,
                **dataclasses.asdict(config)})


if __name__ == "__main__":
  app.run(main)
