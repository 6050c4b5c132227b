"""Nichol & Dhariwal 2021 (Improved DDPM), CIFAR-10 with L_hybrid: its learned-sigma model.

    python -m launch.train --config=configs/cifar10_iddpm.py --workdir=$WORKDIR

Settings from the paper (sec. 3-4) and the improved-diffusion README's
CIFAR-10 flags: 128 channels, 3 res blocks, attention at 16 and 8 with 4 heads,
dropout 0.3, learned-range variance (eq. 15), cosine schedule (eq. 17) with
T=4000, L_hybrid (lambda 0.001), Adam at 1e-4, batch 128, no warmup, EMA
0.9999, 500k steps, no flips, no gradient clipping (improved-diffusion only
logs the gradient norm).

Where this differs from the improved-diffusion code, and why:
- num_steps=500k: the code trains until stopped (lr_anneal_steps=0); 500k is
  the paper's CIFAR-10 training length.
- Sample grids every 50k steps with DDIM, 100 steps: monitoring only (the
  code draws none during training); evaluation is configs/eval/cifar10_iddpm.py.
"""

import ml_collections

from configs import cifar10_ddpm


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return cifar10_ddpm.finish(base(), variant)


def base() -> ml_collections.ConfigDict:
  """What this config sets; other configs start here."""
  config = cifar10_ddpm.base()
  config.data.random_flip = False  # improved-diffusion's loader does not flip
  config.model.update(name="iddpm_cifar10", dropout=0.3)  # 52,546,438 params
  config.diffusion.update(
    schedule="cosine",
    num_timesteps=4000,
    var_type="learned_range",
    loss="hybrid",  # L_simple + 0.001 L_vlb, sec. 3.1
    rescale_timesteps=True,  # the network sees t * 1000 / T, as improved-diffusion feeds it
  )
  config.optim.update(lr=1e-4, warmup_steps=0, grad_clip=0.0)  # improved-diffusion: no clipping
  config.train.update(num_steps=500_000)
  return config
