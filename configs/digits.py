"""The default: a small DDPM on scikit-learn's 8x8 digits; CPU, offline, minutes.

    python -m launch.train --config=configs/digits.py --workdir=workdirs/digits

Trains in minutes on a 2-core CPU and writes a grid of EMA samples to
workdirs/digits/samples/. Smoke variant for tests: --config=configs/digits.py:smoke.

Class-conditional with classifier-free guidance, the offline demonstration
that guidance works: its grids in workdirs/digits_cond/samples/ show row r as
digit r, guided with w = 1 (`:cond,smoke` is its smoke variant):

    python -m launch.train --config=configs/digits.py:cond --workdir=workdirs/digits_cond

EDM (Karras et al. 2022): the same network with EDM's preconditioning and loss,
sampled with EDM's Heun sampler (18 levels, 35 network calls) in its grids
(`:edm,smoke` is its smoke variant; evaluate with configs/eval/digits.py:edm):

    python -m launch.train --config=configs/digits.py:edm --workdir=workdirs/digits_edm
"""

import ml_collections

from diffusion_jax.config import diffusion


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

  parts = set(variant.split(",")) - {""}
  if unknown := parts - {"cond", "edm", "smoke"}:
    raise ValueError(
      f"Unknown variant(s) {sorted(unknown)} of configs/digits.py; known: 'cond',"
      " 'edm', 'smoke' (combine them with a comma)."
    )
  if "cond" in parts:  # class-conditional, with classifier-free guidance (Ho & Salimans 2022)
    config.model.num_classes = 10  # the digits 0-9; label 10 is the null label
    config.train.update(
      label_dropout=0.1,  # p_uncond: trains the null label, the unconditional model
      num_samples=100,  # a 10x10 grid: row r shows digit r
      sample_guidance=1.0,  # w of the grids: eps~ = (1 + w) eps(x, y) - w eps(x, null)
    )
  if "edm" in parts:  # EDM's preconditioning, loss and sampler (docs/training.md)
    config.diffusion.update(
      parameterization="edm",
      sigma_data=0.75,  # the digits' standard deviation in [-1, 1] (EDM: 0.5 for photos)
      p_mean=-1.2,
      p_std=1.2,  # training ln(sigma) ~ N(-1.2, 1.2^2), EDM Table 1
    )
    config.train.update(sampler="edm_heun", sample_steps=18)  # 35 network calls per grid
  if "smoke" in parts:  # a few seconds: for tests
    # One resolution with attention: a third less to trace and compile than (1, 2), which
    # the paper configs' smoke variants keep (tests/test_train.py trains each).
    config.model.update(ch=32, ch_mult=(1,), attn_resolutions=(8,))
    config.train.update(
      batch_size=8,
      num_steps=4,
      log_every=2,
      checkpoint_every=2,
      sample_every=0,
      num_samples=4,
      sample_steps=5 if "edm" not in parts else 3,
      eval_every=0,
    )
  return diffusion.complete_config(config)  # every other field at its default
