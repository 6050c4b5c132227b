"""Progressive distillation (Salimans & Ho, ICLR 2022) of a cifar10_ddpm run: FID ~3 at 4 steps.

    python -m launch.train --config=configs/cifar10_progressive.py \
        --workdir=$WORKDIR --config.distill.teacher_workdir=$TEACHER
    python -m launch.sample --workdir=$WORKDIR --sampler=ddim --steps=4 --checkpoint_step=350000

Settings of the paper's code (google-research/diffusion_distillation,
config/cifar_distill.py): 50k Adam updates per halving, batch 128, learning
rate 5e-5 annealed linearly to 0 within each round, no warmup, no EMA,
gradient clipping at 1, the teacher's U-Net with dropout 0, truncated-SNR
weighting, x_0 clipped when sampling.

Where this differs, and why:
- The teacher is a DDPM of T = 1000 discrete timesteps (ours), not the paper's
  continuous-time cosine-logSNR model: round 0 starts from 512 DDIM steps on
  the trailing grid (the paper's code: 8192 steps), so 9 rounds reach 1 step,
  each grid every other point of the one before.
- The student predicts v (the paper's recommended parameterisation; its
  CIFAR-10 code predicts x).
- The teacher's eps-network initialises the v-student: round 0 also learns
  the new output (the paper's teachers were trained with the student's).
Keep every round's checkpoint (keep_checkpoints = 9): the student of round r,
K = 256 / 2^r steps, is the checkpoint at step (r + 1) x 50000.
Smoke variant for tests: --config=configs/cifar10_progressive.py:smoke.
"""

import ml_collections

from configs import cifar10_ddpm
from diffusion_jax.config import distill

STEPS_PER_ROUND = 50_000


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "smoke"):
    raise ValueError(f"Unknown config variant {variant!r}; known: 'smoke'.")
  teacher = cifar10_ddpm.get_config(variant)
  rounds = 2 if variant else 9  # start_steps / end_steps = 2^rounds
  steps_per_round = 2 if variant else STEPS_PER_ROUND
  config = distill.student_config(teacher, "progressive")
  config.model.dropout = 0.0  # "same as teacher but with 0 dropout"
  config.diffusion.mean_type = "v"
  config.optim = dict(
    optimizer="adam",
    lr=5e-5,
    warmup_steps=0,
    schedule="linear",
    decay_steps=steps_per_round,  # to 0 within each round
    grad_clip=1.0,
  )
  config.train = dict(
    batch_size=8 if variant else 128,
    num_steps=rounds * steps_per_round,
    ema_decay=0.0,
    log_every=1 if variant else 100,
    checkpoint_every=steps_per_round,  # each round's student
    keep_checkpoints=rounds,
  )
  config.distill = dict(
    teacher_workdir="",  # the finished cifar10_ddpm run: set it on the command line
    start_steps=4 if variant else 512,
    end_steps=1,
    steps_per_round=steps_per_round,
  )
  return distill.complete_config(config)
