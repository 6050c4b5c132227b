"""The optax optimizer of a run: Adam(W) or SGD with momentum; linear warmup, LR decay, clipping."""

from __future__ import annotations

import optax

from diffusion_jax.config.optim import OptimConfig


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
  """Linear warmup to `lr`, then constant or decayed to 0 over `decay_steps`."""
  warmup = optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1))
  if config.schedule == "constant":
    after = optax.constant_schedule(config.lr)
  elif config.schedule == "cosine":
    after = optax.cosine_decay_schedule(config.lr, config.decay_steps)
  else:
    after = optax.linear_schedule(config.lr, 0.0, config.decay_steps)
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """-> (clip + the optimizer with the LR schedule, the schedule itself for logging)."""
  schedule = learning_rate_schedule(config)
  if config.optimizer == "sgd":
    opt = optax.sgd(schedule, momentum=config.momentum)
  elif config.optimizer == "adam":
    opt = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
  else:
    opt = optax.adamw(
      schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
    )
  clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
  return optax.chain(clip, opt), schedule
