"""Noise schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - b_t) x_{t-1}, b_t I).

A `Schedule` is an immutable pytree of precomputed float32 arrays of length T.
Every derived quantity is computed in float64 first (as the reference
implementations of Ho et al. 2020 and Nichol & Dhariwal 2021 do) and cast once.

Names follow Ho et al. 2020: alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s
(`alphas_cumprod`). Indices are 0-based: index 0 is the paper's t = 1.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
  """Precomputed terms of a diffusion schedule; every field is a float32 [T] array."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1.
  alphas_cumprod_next: jax.Array  # alpha_bar_{t+1}, with alpha_bar_T = 0.
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance); Ho et al. eq. 6-7.
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array  # log variance, with index 0 set to index 1.
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def from_betas(betas: np.ndarray | Iterable[float]) -> Schedule:
  """Builds every schedule term from betas [T] (computed in float64, stored as float32)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size == 0:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
  if not np.all((betas > 0) & (betas <= 1)):
    raise ValueError("betas must lie in (0, 1].")
  alphas_cumprod = np.cumprod(1.0 - betas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # The variance at index 0 is 0; clip the log so it stays finite (Nichol & Dhariwal).
  posterior_log_variance_clipped = np.log(
    np.append(posterior_variance[1], posterior_variance[1:])
    if betas.size > 1
    else np.maximum(posterior_variance, 1e-20)
  )
  terms = dict(
    betas=betas,
    alphas_cumprod=alphas_cumprod,
    alphas_cumprod_prev=alphas_cumprod_prev,
    alphas_cumprod_next=alphas_cumprod_next,
    sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
    sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
    log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
    sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
    sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
    posterior_variance=posterior_variance,
    posterior_log_variance_clipped=posterior_log_variance_clipped,
    posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
    posterior_mean_coef2=(1.0 - alphas_cumprod_prev)
    * np.sqrt(1.0 - betas)
    / (1.0 - alphas_cumprod),
  )
  return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in terms.items()})


# ----------------------------------------------------------------------------- betas


def linear_betas(num_timesteps: int) -> np.ndarray:
  """Ho et al. 2020: beta linear from 1e-4 to 0.02 at T=1000, scaled by 1000/T.

  The 1000/T scaling (Nichol & Dhariwal 2021) keeps the schedule's shape for
  other T; at T=1000 it is exactly the paper's.
  """
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2).

  beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at `max_beta` near t = T.
  """
  return betas_from_alpha_bar(
    num_timesteps, lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2, max_beta
  )


def quadratic_betas(num_timesteps: int) -> np.ndarray:
  """Ho et al.'s "quad" schedule: sqrt(beta) linear from sqrt(1e-4) to sqrt(0.02)."""
  return np.linspace(1e-4**0.5, 0.02**0.5, num_timesteps, dtype=np.float64) ** 2


def sigmoid_betas(num_timesteps: int) -> np.ndarray:
  """DDIM's "sigmoid" schedule (Song et al. 2021's code): sigmoid(linspace(-6, 6)) on [1e-4, 0.02].

  Not Ho et al.'s: their code's schedules are linear, quad, warmup, const and jsd.
  """
  sigmoid = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)))
  return sigmoid * (0.02 - 1e-4) + 1e-4


def betas_from_alpha_bar(
  num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
  """Discretises a continuous alpha_bar(u), u in [0, 1], into T betas."""
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  abar = np.array([alpha_bar(u) for u in steps]) / alpha_bar(0.0)
  return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


BETA_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
  "linear": linear_betas,
  "cosine": cosine_betas,
  "quadratic": quadratic_betas,
  "sigmoid": sigmoid_betas,
}


def get_schedule(name: str, num_timesteps: int) -> Schedule:
  """Returns the named schedule ("linear", "cosine", "quadratic", "sigmoid") with T steps."""
  if name not in BETA_SCHEDULES:
    raise ValueError(f"Unknown schedule {name!r}; known: {sorted(BETA_SCHEDULES)}.")
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
  return from_betas(BETA_SCHEDULES[name](num_timesteps))


# ----------------------------------------------------------------------------- respacing


def space_timesteps(num_timesteps: int, spec: str | int | Iterable[int]) -> list[int]:
  """The kept timesteps of Improved DDPM's strided sampling (sec. 4), sorted.

  `spec` is one of:
    * an iterable of timesteps to keep, e.g. range(0, 1000, 10);
    * an int N or "N": N steps spread evenly over [0, T-1] (both ends kept);
    * "ddimN": DDIM's stride, every T//N-th step from 0 (Song et al. 2021);
    * "trailingN": round(j T / N) - 1 for j = 1..N, ending at T - 1 (diffusers'
      "trailing" spacing); the grid of N/2 is every other step of N's, the
      nesting progressive distillation's rounds need;
    * "a,b,c": split [0, T) into len sections of near-equal size and take a,
      b, c evenly spaced steps from each (e.g. "10,10,10").
  """
  if isinstance(spec, int):
    spec = str(spec)
  if not isinstance(spec, str):
    steps = sorted({int(t) for t in spec})
    if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
      raise ValueError(f"Timesteps must be a non-empty subset of [0, {num_timesteps}).")
    return steps
  if match := re.fullmatch(r"ddim(\d+)", spec):
    count = int(match.group(1))
    if not 1 <= count <= num_timesteps:
      raise ValueError(f"Cannot take {spec!r} from {num_timesteps} steps.")
    return list(range(0, num_timesteps, num_timesteps // count))[:count]
  if match := re.fullmatch(r"trailing(\d+)", spec):
    count = int(match.group(1))
    if not 1 <= count <= num_timesteps:
      raise ValueError(f"Cannot take {spec!r} from {num_timesteps} steps.")
    return (np.round(np.arange(1, count + 1) * (num_timesteps / count)).astype(int) - 1).tolist()
  if not re.fullmatch(r"\d+(,\d+)*", spec):
    raise ValueError(f"Bad timestep spec {spec!r}; expected 'N', 'ddimN', 'trailingN' or 'a,b,c'.")
  counts = [int(c) for c in spec.split(",")]
  sizes = np.full(len(counts), num_timesteps // len(counts))
  sizes[: num_timesteps % len(counts)] += 1
  steps, start = [], 0
  for size, count in zip(sizes, counts):
    if not 1 <= count <= size:
      raise ValueError(f"Cannot take {count} steps from a section of {size} in {spec!r}.")
    offsets = np.round(np.linspace(0, size - 1, count)).astype(int)
    steps += [start + int(o) for o in offsets]
    start += int(size)
  return steps


def respace(
  schedule: Schedule, use_timesteps: str | int | Iterable[int]
) -> tuple[Schedule, jax.Array]:
  """Restricts `schedule` to a subset of its timesteps (Improved DDPM sec. 4).

  The kept steps t_0 < t_1 < ... keep their alpha_bar; the new betas are
  1 - alpha_bar[t_i] / alpha_bar[t_{i-1}], so q(x_{t_i} | x_0) is unchanged.

  Returns:
    (the respaced schedule, int32 [K] map from new index i to original t_i);
    a model trained on the original schedule is called with the mapped t.
  """
  steps = space_timesteps(schedule.num_timesteps, use_timesteps)
  # alpha_bar in float64 from the stored betas, so keeping every step gives them back.
  alphas_cumprod = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))[steps]
  betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
  return from_betas(betas), jnp.asarray(steps, jnp.int32)
