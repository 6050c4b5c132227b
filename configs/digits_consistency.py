"""Consistency models on the digits: distilled from the digits EDM run (CD), or trained (iCT).

    python -m launch.train --config=configs/digits.py:edm --workdir=workdirs/digits_edm  # teacher
    python -m launch.train --config=configs/digits_consistency.py:cd \
        --workdir=workdirs/digits_cd
    python -m launch.train --config=configs/digits_consistency.py:ict \
        --workdir=workdirs/digits_ict
    python -m launch.sample --workdir=workdirs/digits_cd --sampler=consistency --steps=2

The student is the digits U-Net with EDM's preconditioning (sigma_data 0.75,
as the teacher's) and CM's boundary coefficients. CD: N = 18, target EMA
0.95, unit weights (configs/cifar10_cd.py's settings) with the pseudo-Huber
metric; iCT: configs/cifar10_ict.py's curriculum (N from 11 to 1281),
lognormal levels (-1.1, 2.0) and weights. Rates and lengths are the digits
run's. Smoke variants for tests: `:cd,smoke` (a digits:edm,smoke teacher), `:ict,smoke`.
"""

import ml_collections

from configs import digits
from diffusion_jax.config import distill


def get_config(variant: str = "cd") -> ml_collections.ConfigDict:
  parts = set(variant.split(",")) - {""}
  methods = parts & {"cd", "ict"}
  if parts - {"cd", "ict", "smoke"} or len(methods) != 1:
    raise ValueError(
      f"Unknown variant {variant!r} of configs/digits_consistency.py; known: 'cd'"
      " or 'ict', each with ',smoke'."
    )
  [method] = methods
  smoke = "smoke" in parts
  teacher = digits.get_config("edm,smoke" if smoke else "edm")
  config = distill.student_config(teacher, "consistency")
  config.diffusion.parameterization = "consistency"  # f(x, sigma), boundary at sigma_min
  if method == "ict":
    config.diffusion.update(p_mean=-1.1, p_std=2.0)  # iCT's lognormal levels
  config.optim = dict(
    optimizer="adam",
    lr=2e-4 if method == "cd" else 1e-3,
    warmup_steps=0 if method == "cd" else 100,
    grad_clip=1.0,
  )
  config.train = dict(
    batch_size=8 if smoke else 64,
    num_steps=4 if smoke else (1000 if method == "cd" else 2000),
    ema_decay=0.995,  # the digits run's short horizon
    log_every=2 if smoke else 100,
    checkpoint_every=2 if smoke else 500,
    keep_checkpoints=2,
  )
  config.distill = dict(
    method=method,
    teacher_workdir="workdirs/digits_edm" if method == "cd" else "",
    num_scales=18,
    target_ema=0.95,  # CD
    scales_start=10,
    scales_end=1280,  # iCT
    metric="pseudo_huber",
  )
  return distill.complete_config(config)
