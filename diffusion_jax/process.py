"""The diffusion process a config's `diffusion` section names, made of core parts.

    spec = process.model_spec(config)            # how to read the network's output
    schedule = process.schedule(config)          # the betas and their derived terms
    t_net = process.network_timesteps(config, t)  # what the network is fed for t [B]

The diffusion task (train/diffusion_task.py) and the run loader (runs.py) build a
model's process here, so training, sampling and evaluation read a network alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import consistency, edm, schedules
from diffusion_jax.config.diffusion import DiffusionConfig
from diffusion_jax.diffusion import ModelSpec


def model_spec(config: DiffusionConfig) -> ModelSpec:
  """The mean and variance parameterisation, x_0 clipping and EDM preconditioning of `config`.

  "consistency" is EDM's with a consistency model's c_skip, c_out (consistency.py).
  """
  precond = None
  if config.parameterization in ("edm", "consistency"):
    cls = (
      edm.Preconditioning
      if config.parameterization == "edm"
      else consistency.ConsistencyPreconditioning
    )
    precond = cls(config.sigma_data, config.p_mean, config.p_std)
  return ModelSpec(config.mean_type, config.var_type, config.clip_x0, edm=precond)


def schedule(config: DiffusionConfig) -> schedules.Schedule:
  """The beta schedule of `config` over its num_timesteps."""
  return schedules.get_schedule(config.schedule, config.num_timesteps)


def network_timesteps(config: DiffusionConfig, t: jax.Array) -> jax.Array:
  """The timesteps the network sees for diffusion timesteps t [B].

  t itself, or t * 1000 / T as float32 with `rescale_timesteps`: the
  improved-diffusion code feeds its network timesteps on DDPM's [0, 1000)
  scale whatever T is, so a network trained there needs them.
  """
  if not config.rescale_timesteps:
    return t
  return jnp.asarray(t, jnp.float32) * (1000.0 / config.num_timesteps)
