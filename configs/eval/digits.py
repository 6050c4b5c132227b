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
"""

import ml_collections

from diffusion_jax.evaluation.config import complete_config


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
    config.samplers = tuple(dict(sampler=s, steps=n) for s in ("ddim", "dpm_solver")
                            for n in (5, 10, 20, 50))
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of configs/eval/digits.py; known: 'smoke',"
                     " 'sweep'.")
  return complete_config(config)  # every other field at its default
