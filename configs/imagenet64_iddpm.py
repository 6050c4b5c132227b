"""Nichol & Dhariwal 2021 (Improved DDPM), ImageNet 64x64 unconditional with L_hybrid.

    python -m launch.train --config=configs/imagenet64_iddpm.py --workdir=$WORKDIR

As configs/cifar10_iddpm.py with the 64x64 model (channel multipliers
1,2,3,4; 121M params), no dropout, 1.5M steps, on TFDS's
imagenet_resized/64x64 (prepare it with `tfds build` first; ImageNet needs a
manual download). Like improved-diffusion, it does not clip gradients
(inherited from configs/cifar10_iddpm.py).

Where this differs from the improved-diffusion code, and why:
- num_steps=1.5M: the code trains until stopped; 1.5M is the paper's
  ImageNet 64x64 training length.
- Data: TFDS's imagenet_resized/64x64, the one downsampled ImageNet TFDS
  builds; its resizing may differ from the paper's downsampled ImageNet.
- Sample grids with DDIM, 100 steps: monitoring only.
"""

import ml_collections

from configs import cifar10_ddpm, cifar10_iddpm


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return cifar10_ddpm.finish(base(), variant)


def base() -> ml_collections.ConfigDict:
  """What this config sets; other configs start here."""
  config = cifar10_iddpm.base()
  config.data.update(name="imagenet_resized/64x64", image_size=64)
  config.model.update(name="iddpm_imagenet64", dropout=0.0)  # 121,063,942 params
  config.train.update(num_steps=1_500_000)
  return config
