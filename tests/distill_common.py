"""What the distillation tests share: the Gaussian toy data and its exact functions, the student's
config on a teacher, and the comparison of parameter trees.

The toy data is x_0 ~ N(MU, STD^2) in every pixel. A point z = alpha x_0 + sigma eps of it (VP;
alpha = 1 is EDM's and CM's x = x_0 + sigma n) has the exact denoiser `exact_x0`, and the
probability-flow ODE through a point x at level sigma (alpha = 1) has the endpoint `exact_f`.
"""

import numpy as np

import jax
import jax.numpy as jnp

from diffusion_jax import consistency, edm

MU, STD = 0.3, 0.5


def exact_x0(alpha, sigma, z):
  """E[x_0 | z] for z = alpha x_0 + sigma eps, alpha and sigma broadcasting against z."""
  return MU + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (z - alpha * MU)


def exact_denoiser(x, sigma):
  """D(x; sigma) = E[x_0 | x] for x = x_0 + sigma n, sigma [B] (EDM's view; `exact_x0` at alpha 1)."""
  return exact_x0(1.0, edm.per_example(sigma, x.ndim), x)


def exact_f(x, sigma):
  """The exact consistency function of the toy data, for sigma [B].

  The PF-ODE of x = x_0 + sigma n is affine, x(s) - MU ∝ sqrt(STD^2 + s^2), so
  f(x, sigma) = MU + (x - MU) sqrt((STD^2 + sigma_min^2) / (STD^2 + sigma^2)).
  """
  sigma = edm.per_example(sigma, x.ndim)
  return MU + (x - MU) * jnp.sqrt((STD**2 + consistency.SIGMA_MIN**2) / (STD**2 + sigma**2))


def on_teacher(config, teacher_workdir: str, **train):
  """A smoke distillation `config` with `teacher_workdir` and the `train` settings over its own."""
  config.distill.teacher_workdir = teacher_workdir
  config.train.update(train)
  return config


def leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
