"""Class-conditional DDPM on CIFAR-10 with classifier-free guidance (Ho & Salimans 2022).

    python -m launch.train --config=configs/cifar10_cond.py --workdir=$WORKDIR
    python -m launch.sample --workdir=$WORKDIR --sampler=ddim --steps=50 --guidance=0.3

As configs/cifar10_ddpm.py (Ho et al. 2020's model and recipe) but the U-Net
takes the class label: a learned embedding of the 10 classes plus the null
label, added to the timestep embedding. Training replaces each label by the
null label with probability p_uncond = 0.1 (Ho & Salimans 2022, Algorithm 1;
they find 0.1 or 0.2 best), which trains the unconditional branch that
guidance samples with: eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null) (eq. 6).
Sample grids show one class per row, guided with w = 1 to make the classes
plain; for FID, Ho & Salimans find small w best (0.1 to 0.3 on ImageNet 64x64).
Ho & Salimans did not train on CIFAR-10: this config combines the DDPM recipe
with their training change rather than reproducing a published number.
Smoke variant for tests: --config=configs/cifar10_cond.py:smoke.
"""

import ml_collections

from configs import cifar10_ddpm


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return cifar10_ddpm.finish(base(), variant)


def base() -> ml_collections.ConfigDict:
  """What this config sets; other configs start here."""
  config = cifar10_ddpm.base()
  config.model.num_classes = 10  # CIFAR-10's labels; the null label is index 10
  config.train.update(
    label_dropout=0.1,  # p_uncond, the probability of training a label as the null label
    num_samples=100,  # a 10x10 grid: one row per class
    sample_guidance=1.0,  # w of the grids
  )
  return config
