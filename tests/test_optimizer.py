"""The optimizer of a run against hand-computed closed forms: LR schedules, AdamW, clipping."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config.optim import SCHEDULES, OptimConfig
from diffusion_jax.train import optimizer

LR, WARMUP, DECAY = 1e-3, 100, 1000


def expected_lr(step: int, schedule: str, warmup: int = WARMUP, decay: int = DECAY) -> float:
  """The documented schedule: lr * step / warmup, then lr, or decayed to 0 over `decay` steps."""
  if step < warmup:
    return LR * step / warmup
  progress = min(step - warmup, decay) / decay
  if schedule == "cosine":
    return LR * 0.5 * (1.0 + math.cos(math.pi * progress))
  if schedule == "linear":
    return LR * (1.0 - progress)
  return LR


# 0, mid-warmup, the last warmup step, its end, a quarter and half into the decay, the decay's
# last step, its end, long past it.
STEPS = (0, 50, 99, 100, 350, 600, 1099, 1100, 5000)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_learning_rate_schedule_is_the_closed_form(schedule):
  config = OptimConfig(
    lr=LR,
    warmup_steps=WARMUP,
    schedule=schedule,
    decay_steps=DECAY if schedule != "constant" else 0,
  )
  lr = optimizer.learning_rate_schedule(config)
  np.testing.assert_allclose(
    [float(lr(step)) for step in STEPS],
    [expected_lr(step, schedule) for step in STEPS],
    rtol=1e-5,
    atol=1e-10,
  )


def test_no_warmup_starts_at_the_peak_rate():
  config = OptimConfig(lr=LR, warmup_steps=0, schedule="linear", decay_steps=DECAY)
  lr = optimizer.learning_rate_schedule(config)
  np.testing.assert_allclose(
    [float(lr(step)) for step in (0, 500, 1000)], [LR, LR / 2, 0.0], rtol=1e-5, atol=1e-10
  )


def test_the_optimizer_steps_with_the_schedules_rate():
  """Plain SGD (momentum 0, no clipping) moves a parameter by -lr_k * g at its k-th update."""
  tx, _ = optimizer.make_optimizer(
    OptimConfig(
      optimizer="sgd",
      lr=LR,
      momentum=0.0,
      warmup_steps=4,
      schedule="cosine",
      decay_steps=4,
      grad_clip=0.0,
    )
  )
  params, grad = {"w": jnp.zeros(2)}, {"w": jnp.array([2.0, -3.0])}
  state = tx.init(params)
  for k in range(10):
    updates, state = tx.update(grad, state, params)
    rate = expected_lr(k, "cosine", warmup=4, decay=4)
    np.testing.assert_allclose(
      updates["w"], -rate * np.array([2.0, -3.0]), rtol=1e-5, atol=1e-10, err_msg=f"update {k}"
    )


def test_adamw_decays_weights_decoupled_from_the_adaptive_step():
  """Loshchilov & Hutter 2019: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), two steps."""
  b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.1
  tx, _ = optimizer.make_optimizer(
    OptimConfig(
      optimizer="adamw",
      lr=LR,
      warmup_steps=0,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=wd,
      grad_clip=0.0,
    )
  )
  p0 = np.array([1.0, -2.0, 0.5])
  params = {"w": jnp.asarray(p0, jnp.float32)}
  state = tx.init(params)
  # A zero gradient leaves the weight decay alone: the update is exactly -lr * wd * p.
  updates, _ = tx.update({"w": jnp.zeros(3)}, state, params)
  np.testing.assert_allclose(updates["w"], -LR * wd * p0, rtol=1e-6)

  g1, g2 = np.array([0.3, -0.1, 0.0]), np.array([-0.2, 0.4, 1.0])
  updates, state = tx.update({"w": jnp.asarray(g1, jnp.float32)}, state, params)
  p1 = p0 - LR * (g1 / (np.abs(g1) + eps) + wd * p0)  # m_hat = g, v_hat = g^2 at step 1
  np.testing.assert_allclose(p0 + np.asarray(updates["w"]), p1, rtol=1e-6)
  params = {"w": jnp.asarray(p1, jnp.float32)}
  updates, _ = tx.update({"w": jnp.asarray(g2, jnp.float32)}, state, params)
  m = (b1 * (1 - b1) * g1 + (1 - b1) * g2) / (1 - b1**2)
  v = (b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2) / (1 - b2**2)
  np.testing.assert_allclose(updates["w"], -LR * (m / (np.sqrt(v) + eps) + wd * p1), rtol=1e-4)


@pytest.mark.parametrize("clip", [1.0, 10.0, 0.0], ids=["clipped", "under_the_clip", "off"])
def test_gradients_are_clipped_to_the_global_norm(clip):
  """The whole gradient (norm 5 over two leaves) is scaled to norm `clip` when it exceeds it."""
  tx, _ = optimizer.make_optimizer(
    OptimConfig(optimizer="sgd", lr=1.0, momentum=0.0, warmup_steps=0, grad_clip=clip)
  )
  params = {"a": jnp.zeros(1), "b": jnp.zeros(2)}
  grads = {"a": jnp.array([3.0]), "b": jnp.array([0.0, 4.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  scale = min(1.0, clip / 5.0) if clip else 1.0
  np.testing.assert_allclose(updates["a"], [-3.0 * scale], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [0.0, -4.0 * scale], rtol=1e-6)
