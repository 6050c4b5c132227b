"""Evaluates a training run (or a samples file) with an evaluation config: FID, IS, sFID, P/R, NLL.

    python -m launch.evaluate --config=configs/eval/digits.py --workdir=workdirs/digits
    python -m launch.evaluate --config=configs/eval/cifar10_ddpm.py --workdir=workdirs/cifar10 \
        --config.inception_weights=/data/pt_inception-2015-12-05-6726825d.pth
    python -m launch.evaluate --config=configs/eval/imagenet64_iddpm.py --workdir=workdirs/other \
        --samples=samples.npz --reference=VIRTUAL_imagenet64_labeled.npz

Writes WORKDIR/eval/<config name>-step<N>/report.json (every metric, the
checkpoint step, sampler settings and NFE, weights SHA-256, wall time per
phase), TensorBoard scalars beside it, a table on stdout, and for a sweep over
several samplers fid_vs_nfe.png. Rerunning the same evaluation continues an
interrupted one; a folder holding another evaluation's files (other settings)
or files no evaluation wrote is refused unless --overwrite. A model factory that the workdir's config.json names
("package.module:factory") is code: it is imported only with --trust_model_code.

Several hosts run it as one job, like launch.train and launch.sample
(--multihost on a TPU pod slice; Slurm tasks and JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID are detected): every batch of samples,
features and NLL is split over the devices of all hosts, the statistics are
merged exactly, and process 0 alone writes; the numbers equal one host's.
"""

from absl import flags
from ml_collections import config_flags

from diffusion_jax import evaluation, parallel
from launch import common

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Evaluation config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "The training run; the report goes to WORKDIR/eval/."
)
_SAMPLES = flags.DEFINE_string(
  "samples", None, "Evaluate this .npz ('arr_0': uint8 NHWC) instead of sampling the run."
)
_REFERENCE = flags.DEFINE_string(
  "reference",
  None,
  "Reference statistics .npz (pytorch-fid's or"
  " the ADM evaluator's format) instead of the config's.",
)
_MULTIHOST = common.define_multihost_flag()
_TRUST_MODEL_CODE = common.define_trust_model_code_flag()
_OVERWRITE = common.define_overwrite_flag()
_PROFILE_DIR = common.define_profile_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  common.start(argv)
  parallel.maybe_initialize_distributed(_MULTIHOST.value)
  config = evaluation.from_config_dict(_CONFIG.value)
  with common.profiled(_PROFILE_DIR.value):
    evaluation.evaluate(
      config,
      _WORKDIR.value,
      samples_path=_SAMPLES.value,
      reference_path=_REFERENCE.value,
      trust_model_code=_TRUST_MODEL_CODE.value,
      overwrite=_OVERWRITE.value,
    )


if __name__ == "__main__":
  common.run(main)
