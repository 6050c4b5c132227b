"""Trains a config's task (diffusion, or segmentation: config.task); rerunning resumes.

    python -m launch.train --config=configs/digits.py --workdir=workdirs/digits
    python -m launch.train --config=configs/segmentation_cells.py --workdir=workdirs/cells
    python -m launch.train --config=configs/cifar10_ddpm.py --workdir=gs://bucket/run \
        --config.optim.lr=1e-4

Multi-host (TPU pod slices, Slurm GPU jobs) is detected from the environment;
see launch/tpu_pod.sh and launch/slurm.sbatch. Compiled programs are cached in
$DIFFUSION_JAX_CACHE/xla (default ~/.cache/diffusion_jax/xla), so a restart
skips compiling: --compilation_cache=DIR moves the cache, --compilation_cache=
turns it off.

The model is built from --config, never from the workdir's config.json (a
resumed run's config is compared with it), so a model factory that --config
names ("package.module:factory") is the user's own code and needs no
--trust_model_code.
"""

from absl import flags, logging
from ml_collections import config_flags

from diffusion_jax import parallel
from diffusion_jax.train import loop
from launch import common

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
_MULTIHOST = common.define_multihost_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  common.start(argv)
  parallel.maybe_initialize_distributed(_MULTIHOST.value)
  logging.info("Config:\n%s", _CONFIG.value)
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  common.run(main)
