"""Draws samples from a trained model's EMA parameters into .npz files and a PNG grid.

    python -m launch.sample --workdir=workdirs/digits --num_samples=50000 --sampler=ddim --steps=50
    python -m launch.sample --workdir=workdirs/imagenet64 --sampler=dpm_solver --steps=20 \
        --guidance=1.5 --output=/tmp/samples
    python -m launch.sample --workdir=workdirs/digits --sampler=edm_heun --steps=18  # 35 calls

Writes OUTPUT/batch_*.npz as batches finish, then OUTPUT/samples.npz ('arr_0':
uint8 NHWC, what FID tools read) and OUTPUT/grid.png; OUTPUT defaults to
WORKDIR/samples/step<checkpoint>-<sampler settings>. Rerunning the same command
resumes after the last finished batch, with the same result as one run; an
OUTPUT holding another checkpoint's or sampler's batches, or other files named
like this run's outputs, is refused unless --overwrite. A model factory that
the workdir's config.json names ("package.module:factory") is code: it is
imported only with --trust_model_code.

Every batch is split over all devices. Several hosts run it as one job, like
launch.train (--multihost on a TPU pod slice; Slurm tasks and
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are detected):
each host draws its devices' rows of every batch and process 0 alone writes
OUTPUT, so only process 0 needs to see it. Batch b is drawn with
fold_in(key(seed), b) whatever the number of hosts and devices: a given
--seed and --batch_size give the same images on one host or many, and a run
can be resumed on a different number of hosts.
"""

import jax
from absl import app, flags

from diffusion_jax import checkpoint, files, outputs, parallel, runs, sampling
from diffusion_jax.config.sampler import SPACINGS, TIME_SPACING_BELOW
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding the checkpoints.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 50_000, "Images to draw.")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", sorted(sampling.SAMPLERS), "The sampler.")
_STEPS = flags.DEFINE_integer(
  "steps",
  50,
  "Model calls per image; 0 = all T training steps"
  " (edm_heun: EDM's N noise levels, 2N - 1 calls; 0 = 18).",
)
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM's noise scale, 0 = deterministic (ddim only).")
_ORDER = flags.DEFINE_integer("order", 2, "DPM-Solver++'s multistep order, 1-3 (dpm_solver only).")
_SPACING = flags.DEFINE_enum(
  "spacing",
  "auto",
  list(SPACINGS),
  "DPM-Solver++'s steps uniform in log_snr or time; auto: time below"
  f" {TIME_SPACING_BELOW} steps (dpm_solver only).",
)
_S_CHURN = flags.DEFINE_float("s_churn", 0.0, "EDM's S_churn, 0 = deterministic (edm_heun only).")
_S_TMIN = flags.DEFINE_float("s_tmin", 0.0, "EDM's S_tmin: churn for sigma >= it (edm_heun only).")
_S_TMAX = flags.DEFINE_float("s_tmax", float("inf"), "EDM's S_tmax (edm_heun only).")
_S_NOISE = flags.DEFINE_float("s_noise", 1.0, "EDM's S_noise (edm_heun only).")
_GUIDANCE = flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance scale w; 0 = none.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per batch, over all devices.")
_SEED = flags.DEFINE_integer("seed", 0, "Batch b is drawn with fold_in(key(seed), b).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to sample; default the latest.")
_OUTPUT = flags.DEFINE_string(
  "output", None, "Output directory; default WORKDIR/samples/<settings>."
)
_MULTIHOST = common.define_multihost_flag()
_TRUST_MODEL_CODE = common.define_trust_model_code_flag()
_OVERWRITE = common.define_overwrite_flag()
_PROFILE_DIR = common.define_profile_flag()
flags.mark_flags_as_required(["workdir"])


def main(argv):
  common.start(argv)
  parallel.maybe_initialize_distributed(_MULTIHOST.value)
  if _BATCH_SIZE.value % jax.device_count():
    raise app.UsageError(
      f"--batch_size={_BATCH_SIZE.value} must be a multiple of the {jax.device_count()} devices."
    )
  config = sampling.SamplerConfig(
    _SAMPLER.value,
    _STEPS.value or None,
    _ETA.value,
    _GUIDANCE.value,
    order=_ORDER.value,
    spacing=_SPACING.value,
    s_churn=_S_CHURN.value,
    s_tmin=_S_TMIN.value,
    s_tmax=_S_TMAX.value,
    s_noise=_S_NOISE.value,
  )
  model = runs.load_ema_for_sampling(
    _WORKDIR.value, _STEP.value, trust_model_code=_TRUST_MODEL_CODE.value
  )
  name = f"step{model.step}-{config.label}-seed{_SEED.value}"
  output = _OUTPUT.value or files.join(_WORKDIR.value, "samples", name)
  outputs.check_apart(
    output,
    [files.join(_WORKDIR.value, checkpoint.CONFIG_FILE), files.join(_WORKDIR.value, "checkpoints")],
  )
  with common.profiled(_PROFILE_DIR.value):
    runs.draw_samples(
      model,
      config,
      _NUM_SAMPLES.value,
      _BATCH_SIZE.value,
      output,
      seed=_SEED.value,
      settings={"workdir": _WORKDIR.value},
      overwrite=_OVERWRITE.value,
    )


if __name__ == "__main__":
  common.run(main)
