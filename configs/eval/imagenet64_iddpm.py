"""Improved DDPM / ADM, ImageNet 64x64: FID, sFID, precision and recall against a reference batch.

    python -m launch.evaluate --config=configs/eval/imagenet64_iddpm.py --workdir=$WORKDIR \
        --reference=VIRTUAL_imagenet64_labeled.npz

The protocol of Dhariwal & Nichol's evaluator (guided-diffusion's
evaluations/): 50,000 samples; FID on pool3 and sFID on Mixed_6's first
seven spatial channels, both against the reference batch's statistics
(`mu`, `sigma`, `mu_s`, `sigma_s` of its .npz); improved precision and recall
(k = 3) of the samples' pool features against the reference images'
(`arr_0`, 10,000 images). Without --reference, the statistics of
imagenet_resized/64x64's train split are computed and cached. NLL on the
50,000 validation images with improved-diffusion's protocol (clip_x0).
"""

import ml_collections

from configs.eval import cifar10_ddpm
from diffusion_jax.config.evaluation import complete_config


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_ddpm.get_config()
  config.name = "imagenet64_iddpm"
  config.metrics = ("fid", "sfid", "precision_recall", "nll")
  config.samplers = (dict(sampler="ddpm", steps=250),)  # ADM's ImageNet-64 sampling steps
  config.data.update(name="imagenet_resized/64x64", image_size=64)
  config.nll = dict(split="validation", num_examples=0, batch_size=500, clip_x0=True)
  config.batch_size = 256
  return complete_config(config)  # every other field at its default
