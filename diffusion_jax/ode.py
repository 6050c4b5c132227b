"""Explicit Runge-Kutta ODE solvers in one compiled loop: Dormand-Prince 5(4), adaptive or fixed.

    solution = ode.solve(fn, y0, t0, t1, ode.SolverConfig(rtol=1e-5, atol=1e-5))

`fn(t, y) -> dy/dt` takes a scalar float32 time and a pytree of arrays (the
state may be a sharded global batch). The adaptive solver is Dormand & Prince
(1980)'s RK5(4)7M with the error control of SciPy's `solve_ivp(method="RK45")`
(Hairer, Norsett & Wanner, "Solving ODEs I", sec. II.4): the step is accepted
when the RMS norm of the error estimate, scaled by atol + rtol max(|y|, |y_new|),
is below 1, and the next step is h (0.9 err^-1/5) clipped to [0.2 h, 10 h].
The RMS norm runs over the whole state at once, every example of the batch
(as SciPy's over score_sde's flattened batch): under `jit` with a sharded
state the reduction is one all-reduce, so every device and process sees the
same scalar and takes the same steps; a loop that could end earlier on one
device than on another (a per-example controller) cannot make a
multi-process run hang. The price: an example's value depends on the batch
it is in, within the tolerances.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import configlib

Pytree = Any
OdeFn = Callable[[jax.Array, Pytree], Pytree]
NormFn = Callable[[Pytree], jax.Array]  # a pytree shaped like the state -> scalar RMS

METHODS = ("dopri5", "fixed")

# Dormand-Prince 5(4): nodes C, stages A, 5th-order weights B (the propagated solution, which
# is also the 7th stage's node: FSAL), and E = B - B*, the 5th minus the embedded 4th order
# weights, over the 7 stages (the last one f(t + h, y_new)).
_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0])
_A = (
  (),
  (1 / 5,),
  (3 / 40, 9 / 40),
  (44 / 45, -56 / 15, 32 / 9),
  (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
  (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0
_ERROR_EXPONENT = -1 / 5  # -1 / (order of the error estimator + 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SolverConfig:
  """How to solve: "dopri5" with error control (rtol, atol), or "fixed" steps of its tableau."""

  method: str = "dopri5"
  rtol: float = 1e-5  # score_sde's likelihood.py
  atol: float = 1e-5
  steps: int = 100  # "fixed": equal steps over [t0, t1] (6 evaluations each, +1)
  max_steps: int = 10_000  # "dopri5": attempted steps before giving up (`finished` False)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Unknown ODE solver {self.method!r}; known: {list(METHODS)}.")
    configlib.check_ranges(
      self,
      "solver",
      {
        "rtol": configlib.POSITIVE,
        "atol": configlib.POSITIVE,
        "steps": configlib.AT_LEAST_ONE,
        "max_steps": configlib.AT_LEAST_ONE,
      },
    )


class Solution(NamedTuple):
  """The state at t1 and what reaching it cost; the counters are int32 scalars."""

  y: Pytree
  t: jax.Array  # the time reached: t1 unless the step budget ran out
  nfe: jax.Array  # evaluations of fn (SciPy's nfev)
  accepted: jax.Array
  rejected: jax.Array
  finished: jax.Array  # bool: t reached t1


def rms_norm(tree: Pytree) -> jax.Array:
  """sqrt(mean(x^2)) over every element of every leaf (SciPy's norm of the flattened state)."""
  leaves = jax.tree.leaves(tree)
  total = sum(jnp.sum(jnp.square(leaf)) for leaf in leaves)
  return jnp.sqrt(total / sum(leaf.size for leaf in leaves))


def _axpy(y: Pytree, h: jax.Array, coefficients, ks) -> Pytree:
  """y + h sum_i c_i k_i, leafwise (zero coefficients skipped)."""

  def leaf(y_leaf, *k_leaves):
    terms = [c * k for c, k in zip(coefficients, k_leaves) if c != 0.0]
    return y_leaf + h * sum(terms) if terms else y_leaf

  return jax.tree.map(leaf, y, *ks)


def _dopri_step(fn: OdeFn, t, y, f0, h):
  """One Dormand-Prince step from (t, y) with f0 = fn(t, y): (y_new, f_new, h * error estimate)."""
  ks = [f0]
  for i in range(1, 6):
    ks.append(fn(t + _C[i] * h, _axpy(y, h, _A[i], ks)))
  y_new = _axpy(y, h, _B, ks)
  f_new = fn(t + h, y_new)
  error = _axpy(jax.tree.map(jnp.zeros_like, y), h, _E, ks + [f_new])
  return y_new, f_new, error


def _scaled(tree, y, y_new, rtol, atol):
  return jax.tree.map(
    lambda e, a, b: e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))), tree, y, y_new
  )


def _initial_step(fn: OdeFn, t0, y0, f0, t1, rtol, atol, norm: NormFn):
  """SciPy's `select_initial_step` (Hairer et al. sec. II.4): one extra evaluation of fn."""
  scale = lambda tree: _scaled(tree, y0, y0, rtol, atol)
  d0, d1 = norm(scale(y0)), norm(scale(f0))
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
  h0 = jnp.minimum(h0, t1 - t0)
  f1 = fn(t0 + h0, _axpy(y0, h0, (1.0,), [f0]))
  d2 = norm(scale(jax.tree.map(jnp.subtract, f1, f0))) / h0
  d12 = jnp.maximum(d1, d2)
  h1 = jnp.where(
    d12 <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / jnp.maximum(d12, 1e-30)) ** (1 / 5)
  )
  return jnp.minimum(jnp.minimum(100 * h0, h1), t1 - t0)


def solve(
  fn: OdeFn,
  y0: Pytree,
  t0: float,
  t1: float,
  config: SolverConfig = SolverConfig(),
  *,
  norm: NormFn = rms_norm,
) -> Solution:
  """Integrates dy/dt = fn(t, y) from t0 to t1 > t0 in one `lax.while_loop` (jit-able, pure).

  Args:
    fn: the right-hand side, (scalar t, pytree y) -> pytree like y.
    y0: the state at t0.
    config: the method and its tolerances or step count.
    norm: the RMS norm of a scaled error pytree; a weighted one leaves padding out.
      It must reduce over the whole (sharded) state so every device gets the same value.
  """
  t0 = jnp.asarray(t0, jnp.float32)
  t1 = jnp.asarray(t1, jnp.float32)
  f0 = fn(t0, y0)
  if config.method == "fixed":
    return _solve_fixed(fn, y0, f0, t0, t1, config.steps)
  rtol, atol = config.rtol, config.atol
  h_abs = _initial_step(fn, t0, y0, f0, t1, rtol, atol, norm)
  # t, y, f(t, y), |h|, a rejection since the last accepted step, nfe, accepted, rejected
  state = (t0, y0, f0, h_abs, jnp.asarray(False), jnp.int32(2), jnp.int32(0), jnp.int32(0))

  def running(state):
    t, accepted, rejected = state[0], state[6], state[7]
    return (t < t1) & (accepted + rejected < config.max_steps)

  def attempt(state):
    t, y, f, h_abs, rejected_before, nfe, accepted, rejected = state
    last = t + h_abs >= t1
    t_new = jnp.where(last, t1, t + h_abs)
    h = t_new - t
    y_new, f_new, error = _dopri_step(fn, t, y, f, h)
    error_norm = norm(_scaled(error, y, y_new, rtol, atol))
    ok = error_norm < 1.0
    grow = jnp.where(
      error_norm == 0.0,
      _MAX_FACTOR,
      jnp.minimum(_MAX_FACTOR, _SAFETY * jnp.maximum(error_norm, 1e-30) ** _ERROR_EXPONENT),
    )
    grow = jnp.where(rejected_before, jnp.minimum(1.0, grow), grow)
    shrink = jnp.maximum(_MIN_FACTOR, _SAFETY * jnp.maximum(error_norm, 1e-30) ** _ERROR_EXPONENT)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return (
      jnp.where(ok, t_new, t),
      pick(y_new, y),
      pick(f_new, f),
      h * jnp.where(ok, grow, shrink),
      ~ok,
      nfe + 6,
      accepted + ok.astype(jnp.int32),
      rejected + (~ok).astype(jnp.int32),
    )

  t, y, _, _, _, nfe, accepted, rejected = jax.lax.while_loop(running, attempt, state)
  return Solution(y, t, nfe, accepted, rejected, t >= t1)


def _solve_fixed(fn: OdeFn, y0, f0, t0, t1, steps: int) -> Solution:
  """`steps` equal Dormand-Prince steps (5th order, no error control): 6 steps + 1 evaluations."""
  h = (t1 - t0) / steps

  def step(i, carry):
    y, f = carry
    y_new, f_new, _ = _dopri_step(fn, t0 + i * h, y, f, h)
    return y_new, f_new

  y, _ = jax.lax.fori_loop(0, steps, step, (y0, f0))
  count = jnp.int32(steps)
  return Solution(y, t1, 6 * count + 1, count, jnp.int32(0), jnp.asarray(True))
