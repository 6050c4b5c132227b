"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a conditional model."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.sampling.loop import ModelFn

ConditionalModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def classifier_free_guidance(
  model_fn: ConditionalModelFn,
  spec: ModelSpec,
  labels: jax.Array,
  guidance_scale: float,
  null_label: int,
) -> ModelFn:
  """A guided `model_fn(x_t, t)` from a conditional `model_fn(x_t, t, y)`.

  Ho & Salimans 2022 eq. 6: eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null).
  Both passes are one model call on the batch doubled along axis 0. The
  combination is applied to the mean channels whatever they predict (eps, x_0
  or v are affine in one another at fixed x_t, so the guided eps is the same);
  a learned variance is taken from the conditional pass.

  Args:
    model_fn: conditional model, (x_t [B, ...], t int [B], y int [B]) -> output.
    spec: the output parameterisation (to find the mean channels).
    labels: int [B] class labels y.
    guidance_scale: w >= 0; w = 0 is the conditional model alone.
    null_label: the label of the unconditional pass (the zoo uses num_classes).
  """

  def guided(x_t, t):
    y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
    output = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), y)
    conditional, unconditional = jnp.split(output, 2, axis=0)
    mean_c, var_c = diffusion.split_output(spec, conditional)
    mean_u, _ = diffusion.split_output(spec, unconditional)
    mean = mean_c + guidance_scale * (mean_c - mean_u)
    return mean if var_c is None else jnp.concatenate([mean, var_c], axis=-1)

  return guided
