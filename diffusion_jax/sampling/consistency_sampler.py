"""Multistep consistency sampling (Song et al. 2023, Algorithm 1) of a consistency model.

    f = sampling.denoisers.from_edm(net_fn, spec)  # spec.edm: a ConsistencyPreconditioning
    images = sampling.consistency_sample(f, key, (16, 32, 32, 3), num_steps=2)

One `lax.scan` (`loop.run_steps`) over the levels; each step is one call of f.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import consistency, edm
from diffusion_jax.consistency import ConsistencyPreconditioning
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.sampling import denoisers
from diffusion_jax.sampling.denoisers import Denoiser
from diffusion_jax.sampling.loop import ModelFn, initial_noise, run_steps


def consistency_levels(
  num_steps: int,
  sigma_min: float = consistency.SIGMA_MIN,
  sigma_max: float = consistency.SIGMA_MAX,
  rho: float = consistency.RHO,
) -> jax.Array:
  """float32 [num_steps]: tau_0 = sigma_max > tau_1 > ...: the first of EDM eq. 5's K + 1 levels.

  Its last, sigma_min, would add no noise. 1 step: 80; 2 steps: 80 and 2.52.
  Our choice: the papers tune theirs (iCT's 2-step CIFAR-10 level is 0.821).
  """
  return edm.karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho)[:-1]


def consistency_sample(
  f: Denoiser,
  key: jax.Array,
  shape,
  *,
  num_steps: int = 1,
  sigma_min: float = consistency.SIGMA_MIN,
  x_T: jax.Array | None = None,
) -> jax.Array:
  """CM Algorithm 1: float32 `shape` from `num_steps` calls of the consistency function f.

  x = f(tau_0 x_T, tau_0), x_T ~ N(0, I) (drawn from key unless given); then
  for n >= 1: x = f(x + sqrt(tau_n^2 - sigma_min^2) z_n, tau_n), z_n drawn
  from fold_in(key', n), at the levels tau_n of `consistency_levels`.
  """
  levels = consistency_levels(num_steps, sigma_min)
  x, key = initial_noise(key, shape, x_T)

  def step(x, i, step_key, state):
    z = jax.random.normal(step_key, x.shape, x.dtype)
    added = jnp.sqrt(jnp.maximum(jnp.square(levels[i]) - sigma_min**2, 0.0))
    x = jnp.where(i == 0, x, x + added * z)
    x0 = f.denoise(x, jnp.full(x.shape[:1], levels[i], jnp.float32))
    return x0, x0, state

  return run_steps(step, x * levels[0], jnp.arange(num_steps, dtype=jnp.int32), key, steps=None)


def consistency_model_sample(
  model_fn: ModelFn,
  spec: ModelSpec,
  schedule,
  key: jax.Array,
  shape,
  *,
  num_steps: int = 1,
  x_T: jax.Array | None = None,
) -> jax.Array:
  """`consistency_sample` in the samplers' common signature: model_fn is the network F of a
  consistency-trained run (spec.edm a `ConsistencyPreconditioning`); `schedule` is unused."""
  del schedule
  if not isinstance(spec.edm, ConsistencyPreconditioning):
    raise ValueError(
      "The consistency sampler needs a consistency model (a run with"
      " diffusion.parameterization='consistency'), got"
      f" {'an EDM' if spec.edm else 'a discrete-time'} model."
    )
  return consistency_sample(
    denoisers.from_edm(model_fn, spec),
    key,
    shape,
    num_steps=num_steps,
    sigma_min=spec.edm.sigma_min,
    x_T=x_T,
  )
