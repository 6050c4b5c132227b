"""Ho et al. 2020 (DDPM), CelebA-HQ 256x256: FID of 30,000 samples against the dataset.

    python -m launch.evaluate --config=configs/eval/celebahq256_ddpm.py --workdir=$WORKDIR

Ancestral sampling over all 1000 steps, as the paper; FID against all 30,000
CelebA-HQ images (TFDS's celeb_a_hq/256 holds them in its train split; it
needs a manual download, see configs/celebahq256_ddpm.py). The dataset has no
test split, so no NLL.
"""

import ml_collections

from configs.eval import cifar10_ddpm
from diffusion_jax.config.evaluation import complete_config


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_ddpm.get_config()
  config.name = "celebahq256_ddpm"
  config.metrics = ("fid",)
  config.num_samples = 30_000  # as many as the dataset's images
  config.batch_size = 64
  config.data.update(name="celeb_a_hq/256", image_size=256)
  config.feature_batch_size = 100
  return complete_config(config)  # every other field at its default
