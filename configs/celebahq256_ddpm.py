"""Ho et al. 2020 (DDPM), CelebA-HQ 256x256 unconditional.

    python -m launch.train --config=configs/celebahq256_ddpm.py --workdir=$WORKDIR

As configs/cifar10_ddpm.py but (App. B): the 114M six-level U-Net without
dropout, batch 64, lr 2e-5, 0.5M steps; and, as the TF code's
scripts/run_celebahq.py samples (diffusion_utils.py), with the posterior
variance sigma_t^2 = beta~_t (fixed_small). TFDS's celeb_a_hq needs a manual
download (see its catalog page) before `tfds build celeb_a_hq/256`.

Where this differs from the TF code, and why:
- num_steps=500k: the code trains until stopped; 0.5M is the paper's length.
- Sample grids of 16 images with DDIM, 100 steps: monitoring only.
"""

import ml_collections

from configs import cifar10_ddpm


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return cifar10_ddpm.finish(base(), variant)


def base() -> ml_collections.ConfigDict:
  """What this config sets; other configs start here."""
  config = cifar10_ddpm.base()
  config.data.update(name="celeb_a_hq/256", image_size=256)
  config.model.update(name="ddpm_celebahq256", dropout=0.0)  # 113,673,219 params
  config.diffusion.var_type = "fixed_small"  # the CelebA-HQ code samples with beta~_t
  config.optim.lr = 2e-5  # App. B: 2e-5 for 256x256
  config.train.update(batch_size=64, num_steps=500_000, num_samples=16)
  return config
