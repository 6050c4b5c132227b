"""Ho et al. 2020 (DDPM), CIFAR-10 unconditional: FID 3.17 at 800k steps (paper, Table 1).

    python -m launch.train --config=configs/cifar10_ddpm.py --workdir=$WORKDIR

Settings from the paper's sec. 4 and App. B: the 35.7M U-Net, linear betas
1e-4..0.02 over T=1000, eps-prediction with L_simple, Adam at 2e-4 with 5000
warmup steps, batch 128, dropout 0.1, EMA 0.9999, random horizontal flips,
800k steps; sampling with sigma_t^2 = beta_t (fixed_large). These are also the
defaults of the TF code's scripts/run_cifar.py (gradient clipping at 1 included).

Where this differs from the TF code, and why:
- num_steps=800k: the code trains until stopped; 800k is the paper's length.
- Sample grids every 50k steps with DDIM, 100 steps: monitoring only (the
  code's evaluation worker samples separately); evaluation is
  configs/eval/cifar10_ddpm.py.
Smoke variant for tests: --config=configs/cifar10_ddpm.py:smoke.
"""

import ml_collections

from configs import smoke
from diffusion_jax.config import diffusion


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return finish(base(), variant)


def base() -> ml_collections.ConfigDict:
  """What this config sets, before the defaults fill in the rest; other configs start here."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = dict(
    source="tfds",
    name="cifar10",
    split="train",
    image_size=32,  # pixels
    num_channels=3,
    random_flip=True,  # Ho et al. sec. 4: "random horizontal flips"
    shuffle=True,
    num_threads=4,  # decoding threads per host
  )

  config.model = dict(
    name="ddpm_cifar10",  # 35,746,307 params
    dropout=0.1,
    dtype="float32",  # compute dtype; "bfloat16" on TPU/GPU (params stay float32)
    remat=False,  # gradient checkpointing of residual blocks
  )

  config.diffusion = dict(
    schedule="linear",
    num_timesteps=1000,  # beta 1e-4 to 0.02
    mean_type="epsilon",
    var_type="fixed_large",
    loss="simple",  # Ho et al. eq. 14
    timestep_sampler="uniform",
  )

  config.optim = dict(
    optimizer="adam",
    lr=2e-4,  # App. B: 2e-4 for 32x32
    warmup_steps=5000,  # linear warmup, steps
    grad_clip=1.0,  # global norm
  )

  config.train = dict(
    batch_size=128,  # global, images per step
    num_steps=800_000,
    ema_decay=0.9999,
    log_every=100,
    checkpoint_every=10_000,
    keep_checkpoints=3,
    sample_every=50_000,
    num_samples=64,
    sampler="ddim",
    sample_steps=100,  # grids only; evaluation samples with all 1000 steps
  )
  return config


def finish(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """`config` with every field at its default where unset (so all can be overridden), varied."""
  config = diffusion.complete_config(config)
  if variant == "smoke":
    return smoke.shrink(config)
  if variant:
    raise ValueError(f"Unknown config variant {variant!r}; known: 'smoke'.")
  return config
