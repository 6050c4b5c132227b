"""Nichol & Dhariwal 2021 (Improved DDPM), CIFAR-10: NLL on the test set, FID with respaced sampling.

    python -m launch.evaluate --config=configs/eval/cifar10_iddpm.py --workdir=$WORKDIR
    python -m launch.evaluate --config=configs/eval/cifar10_iddpm.py:sweep --workdir=$WORKDIR

The paper's protocol: NLL as improved-diffusion's `image_nll.py` computes it
(the full bound over all 4000 steps on the 10,000 test images, with the
predicted x_0 clipped to [-1, 1] in every term: clip_x0), and FID of 50,000
samples against the training set with the sampler respaced to fewer steps
(sec. 4: 100 steps come close to the full 4000). `:sweep` draws 50,000
samples at each of 25, 50, 100, 200, 1000 and 4000 steps, for the
FID-vs-NFE table and fid_vs_nfe.png (as the paper's Figure 8).
"""

import ml_collections

from configs.eval import cifar10_ddpm
from diffusion_jax.config.evaluation import complete_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = cifar10_ddpm.get_config()
  config.name = "cifar10_iddpm"
  config.metrics = ("fid", "nll")
  config.samplers = (dict(sampler="ddpm", steps=100),)
  config.nll.clip_x0 = True  # image_nll.py: calc_bpd_loop(clip_denoised=True)
  if variant == "sweep":
    config.name = "cifar10_iddpm_sweep"
    config.samplers = tuple(dict(sampler="ddpm", steps=n) for n in (25, 50, 100, 200, 1000, 0))
  elif variant:
    raise ValueError(
      f"Unknown variant {variant!r} of configs/eval/cifar10_iddpm.py; known: 'sweep'."
    )
  return complete_config(config)  # every other field at its default
