"""Ho et al. 2020 (DDPM), CelebA-HQ 256x256 unconditional.

    python -m launch.train --config=configs/celebahq256_ddpm.py --workdir=$WORKDIR

As configs/cifar10_ddpm.py but (App. B): the 114M six-level U-Net without
dropout, batch 64, lr 2e-5, 0.5M steps. TFDS's celeb_a_hq needs a manual
download (see its catalog page) before `tfds build celeb_a_hq/256`.
"""

import ml_collections

from configs import cifar10_ddpm


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = cifar10_ddpm.get_config()
  config.data.update(name="celeb_a_hq/256", image_size=256)
  config.model.update(name="ddpm_celebahq256", dropout=0.0)  # 113,673,219 params
  config.optim.lr = 2e-5  # App. B: 2e-5 for 256x256
  config.train.update(batch_size=64, num_steps=500_000, num_samples=16)
  return cifar10_ddpm._variant(config, variant)
