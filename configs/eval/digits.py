"""The offline evaluation of the default digits run: NLL, and sample quality against real digits.

    python -m launch.train --config=configs/digits.py --workdir=workdirs/digits
    python -m launch.evaluate --config=configs/eval/digits.py --workdir=workdirs/digits

CPU, offline, minutes. Inception features mean nothing on 8x8 digits, so the
sample metrics are the Fréchet distance (`fd_digits`) and the Inception
Score's formula (`is_digits`) on the features and logits of a small digits
classifier trained here in seconds and cached: comparable between digits
runs, not with any published FID or IS. The same numbers for the 300 held-out
real digits (`real_floor`) show how close real data gets; the NLL in bits/dim
is the full bound on those held-out digits (test split).

`:edm` evaluates a configs/digits.py:edm run (no NLL: EDM has no DDPM bound);
`:nfe` is docs/sampling.md's table: fd_digits against NFE for DDIM,
DPM-Solver++ (orders 2 and 3) and EDM's Heun (deterministic and with churn),
on either kind of run:

    python -m launch.evaluate --config=configs/eval/digits.py:nfe --workdir=workdirs/digits

`:few` scores a teacher at 1, 2, 4, 8 and 50 steps (DDIM, DPM-Solver++),
`:distilled` a progressive student at its checkpoint's K steps
(--config.checkpoint_step picks the round), `:consistency` a consistency
model at 1, 2 and 4 steps (docs/distillation.md).
"""

import ml_collections

from diffusion_jax.config.evaluation import complete_config


# (sampler settings) at about 5, 10, 20 and 50 network calls; EDM's Heun makes 2N - 1 calls.
# The churn is mild (Algorithm 2's gamma = 5 / N, on sigma in [0.05, 50]): EDM's ImageNet
# setting, S_churn = 40, is tuned for 256 steps.
EDM_CHURN = dict(s_churn=5.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
NFE_SWEEP = (
  *(dict(sampler=s, steps=n) for s in ("ddim", "dpm_solver") for n in (5, 10, 20, 50)),
  *(dict(sampler="dpm_solver", steps=n, order=3) for n in (5, 10, 20, 50)),
  *(
    dict(sampler="edm_heun", steps=n, **churn) for churn in ({}, EDM_CHURN) for n in (3, 5, 10, 25)
  ),  # 5, 9, 19, 49 calls
)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "digits"  # the report goes to WORKDIR/eval/digits-step<N>/
  config.metrics = ("fd_digits", "is_digits", "nll")
  config.samplers = (dict(sampler="ddim", steps=50),)  # the training run's grid sampler
  config.num_samples = 300  # as many as the held-out real digits, so both have the same bias
  config.batch_size = 300  # images per sampling batch
  config.seed = 0
  config.checkpoint_step = -1  # the latest
  config.data = dict(source="digits", image_size=8, num_channels=1, num_threads=0)
  config.reference_split = "train"  # statistics of the 1,497 training digits
  config.real_floor = True  # score the 300 held-out digits too
  config.nll = dict(split="test", num_examples=0, batch_size=300, clip_x0=True)
  config.is_splits = 10
  config.feature_batch_size = 300

  if variant == "smoke":  # seconds: for tests
    config.samplers = (dict(sampler="ddim", steps=3),)
    config.num_samples = 20
    config.batch_size = 8
    config.nll = dict(split="test", num_examples=8, batch_size=8, clip_x0=True)
    config.is_splits = 2
  elif variant == "sweep":  # FID-vs-NFE figure on the digits
    config.samplers = tuple(
      dict(sampler=s, steps=n) for s in ("ddim", "dpm_solver") for n in (5, 10, 20, 50)
    )
  elif variant == "few":  # a teacher at the NFE of distilled students (docs/distillation.md)
    config.metrics = ("fd_digits", "is_digits")
    config.samplers = tuple(
      dict(sampler=s, steps=n) for s in ("ddim", "dpm_solver") for n in (1, 2, 4, 8, 50)
    )
  elif variant in ("distilled", "consistency"):  # a student of configs/digits_progressive.py
    config.metrics = ("fd_digits", "is_digits")  # or digits_consistency.py: no DDPM bound
    config.samplers = (
      (dict(sampler="ddim"),)
      if variant == "distilled"  # all its K steps
      else tuple(dict(sampler="consistency", steps=n) for n in (1, 2, 4))
    )
  elif variant in ("edm", "nfe"):  # runs of configs/digits.py:edm have no DDPM bound: no NLL
    config.metrics = ("fd_digits", "is_digits")
    config.samplers = (dict(sampler="edm_heun", steps=18),)  # 35 network calls
    if variant == "nfe":  # docs/sampling.md's table: every sampler at about 5 to 50 NFE
      config.samplers = NFE_SWEEP
  elif variant:
    raise ValueError(
      f"Unknown variant {variant!r} of configs/eval/digits.py; known: 'smoke',"
      " 'sweep', 'edm', 'nfe', 'few', 'distilled', 'consistency'."
    )
  return complete_config(config)  # every other field at its default
