"""Progressive distillation (Salimans & Ho 2022) of the default digits run: 64 DDIM steps to 1.

    python -m launch.train --config=configs/digits.py --workdir=workdirs/digits   # the teacher
    python -m launch.train --config=configs/digits_progressive.py \
        --workdir=workdirs/digits_progressive
    python -m launch.sample --workdir=workdirs/digits_progressive --sampler=ddim --steps=1

Six rounds halve the teacher's 64 DDIM steps to 32, 16, 8, 4, 2 and 1; each
round's last checkpoint is kept, so `--checkpoint_step=N` samples the
student of the round that ended at step N (round r ends at (r + 1) x 400).
The student is the teacher's network predicting v, without dropout; settings
follow configs/cifar10_progressive.py but for a rate fit for a small model
(5e-4 instead of 5e-5) and 400 steps a round. Smoke variant for tests:
--config=configs/digits_progressive.py:smoke (a digits:smoke teacher, 4 -> 2 -> 1 steps).
"""

import ml_collections

from configs import digits
from diffusion_jax.config import distill


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "smoke"):
    raise ValueError(f"Unknown config variant {variant!r}; known: 'smoke'.")
  smoke = variant == "smoke"
  teacher = digits.get_config(variant)  # the student's network and process are the teacher's
  steps_per_round = 2 if smoke else 400
  rounds = 2 if smoke else 6  # start_steps / end_steps = 2^rounds
  config = distill.student_config(teacher, "progressive")
  config.model.dropout = 0.0  # the paper's students train without dropout
  config.diffusion.mean_type = "v"  # the student predicts v (Salimans & Ho sec. 4)
  config.optim = dict(
    optimizer="adam",
    lr=5e-4,
    warmup_steps=0,
    schedule="linear",
    decay_steps=steps_per_round,  # annealed to 0 within each round
    grad_clip=1.0,
  )
  config.train = dict(
    batch_size=8 if smoke else 64,
    num_steps=rounds * steps_per_round,
    ema_decay=0.0,  # the paper's code: no EMA; each round's teacher is the last student
    log_every=2 if smoke else 100,
    checkpoint_every=steps_per_round,  # one checkpoint per round: each K's student
    keep_checkpoints=rounds,
  )
  config.distill = dict(
    teacher_workdir="workdirs/digits",  # the default digits run
    start_steps=4 if smoke else 64,  # the teacher's DDIM steps in round 0
    end_steps=1,
    steps_per_round=steps_per_round,
  )
  return distill.complete_config(config)
