"""Consistency distillation (Song et al., ICML 2023) of a cifar10_edm run: 1-step FID 3.55 (paper).

    python -m launch.train --config=configs/cifar10_cd.py --workdir=$WORKDIR \
        --config.distill.teacher_workdir=$EDM_TEACHER
    python -m launch.sample --workdir=$WORKDIR --sampler=consistency --steps=1

CM's CIFAR-10 CD settings (paper Table 3; openai/consistency_models_cifar10
configs/cifar10_ve_cd.py): the EDM teacher's network and initialisation,
N = 18 levels on [0.002, 80] (rho 7), Heun's ODE solver, target EMA mu = 0.95,
unit weights, batch 512, 800k steps, lr 4e-4 after a 10 Mimg warmup (19,531
steps), no gradient clipping, dropout 0, sampling EMA 0.9999.

Where this differs, and why:
- Metric: l2, not the paper's LPIPS, whose weights are files this config cannot
  name; the paper's l2 CD is markedly worse than its LPIPS one. For LPIPS (the
  images resized to 224, as CM's code does) add
    --config.distill.metric=lpips --config.distill.lpips_weights=LPIPS/weights/v0.1/vgg.pth
    --config.distill.vgg_weights=TORCH_HOME/hub/checkpoints/vgg16-397923af.pth
  (the lpips wheel's linear layers and torchvision's vgg16 state dict).
- Adam instead of RAdam (optax has both; the project's optimizer section offers Adam).
- The teacher and student network is the zoo's DDPM++-layout U-Net of
  configs/cifar10_edm.py, not NCSN++.
Smoke variant for tests: --config=configs/cifar10_cd.py:smoke.
"""

import ml_collections

from configs import cifar10_edm
from diffusion_jax.config import distill


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "smoke"):
    raise ValueError(f"Unknown config variant {variant!r}; known: 'smoke'.")
  teacher = cifar10_edm.get_config(variant)
  config = distill.student_config(teacher, "consistency")
  config.model.dropout = 0.0
  config.diffusion.parameterization = "consistency"
  config.optim = dict(
    optimizer="adam", lr=4e-4, warmup_steps=2 if variant else 19_531, grad_clip=0.0
  )
  config.train = dict(
    batch_size=8 if variant else 512,
    num_steps=2 if variant else 800_000,
    ema_decay=0.9999,
    log_every=1 if variant else 100,
    checkpoint_every=2 if variant else 10_000,
    keep_checkpoints=3,
  )
  config.distill = dict(
    method="cd", teacher_workdir="", num_scales=18, target_ema=0.95, metric="l2"
  )
  return distill.complete_config(config)
