"""The `:smoke` variant shared by every paper config: the same settings at a tiny size.

Keeps the config's model family, schedule, parameterisation and loss; shrinks
width, image size, batch and step counts so a test runs it in seconds.
"""

import ml_collections


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
  if config.model.num_classes is not None:
    config.model.num_classes = 10
  config.data.update(image_size=16, num_threads=0)
  config.diffusion.num_timesteps = 100
  config.optim.warmup_steps = 2
  config.train.update(
    batch_size=8,
    num_steps=2,
    log_every=1,
    checkpoint_every=2,
    sample_every=0,
    num_samples=4,
    sample_steps=4,
  )
  return config
