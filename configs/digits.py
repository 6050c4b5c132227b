"""The default: a small DDPM on scikit-learn's 8x8 digits; CPU, offline, minutes.

    python -m launch.train --config=configs/digits.py --workdir=workdirs/digits

Trains in minutes on a 2-core CPU and writes a grid of EMA samples to
workdirs/digits/samples/. Smoke variant for tests: --config=configs/digits.py:smoke.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds init, the data order and the train step's noise

  config.data = dict(
      source="digits",  # scikit-learn's 8x8 digits; ship inside the package
      split="train",  # 1,497 digits; "test" (a fixed random 300) is held out
      image_size=8,  # pixels: the digits' own size
      num_channels=1,  # grayscale
      random_flip=False,  # digits are not mirror-symmetric
      shuffle=True,
      num_threads=0,  # in-memory data: no decoding threads needed
  )

  config.model = dict(
      name="ddpm_cifar10",  # the zoo's DDPM U-Net, shrunk below
      ch=64,  # base channels
      ch_mult=(1, 2),  # resolutions 8 and 4
      num_res_blocks=1,
      attn_resolutions=(4,),  # self-attention at 4x4
      dropout=0.0,
  )

  config.diffusion = dict(
      schedule="cosine",  # Improved DDPM: better than linear at small sizes
      num_timesteps=1000,  # T
      mean_type="epsilon",
      var_type="fixed_large",  # Ho et al.'s choice for sampling with eps-prediction
      loss="simple",
      timestep_sampler="uniform",
  )

  config.optim = dict(
      optimizer="adam",
      lr=2e-3,  # a small model on a tiny data set tolerates a large rate
      warmup_steps=100,  # steps of linear warmup
      grad_clip=1.0,  # global-norm clipping
  )

  config.train = dict(
      batch_size=64,  # global batch, images per step
      num_steps=1000,  # ~5 minutes on a 2-core CPU; recognisable digits from ~500
      ema_decay=0.995,  # short run: a short EMA horizon (~200 steps)
      log_every=100,  # steps between metric writes
      checkpoint_every=500,  # steps between checkpoints
      keep_checkpoints=2,
      sample_every=500,  # steps between sample grids
      num_samples=64,  # images per grid
      sampler="ddim",
      sample_steps=50,
      eval_every=500,  # steps between sample-quality evaluations (TensorBoard eval/fd_digits)
      eval_num_samples=300,  # as many as the held-out digits (configs/eval/digits.py)
      eval_metric="fd_digits",  # Fréchet distance on the digits classifier's features
  )

  if variant == "smoke":  # a few seconds: for tests
    config.model.update(ch=32)
    config.train.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2,
                        sample_every=0, num_samples=4, sample_steps=5, eval_every=0)
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of configs/digits.py; known: 'smoke'.")
  return config
