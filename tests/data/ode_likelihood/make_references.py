"""Reference values for tests/test_ode_likelihood.py: score_sde's likelihood procedure, re-implemented.

    python tests/data/ode_likelihood/make_references.py   # writes references.npz beside it

Not run by the tests. It follows `likelihood.py` of yang-song/score_sde (commit
0acb9e0, the JAX version): the VP SDE (beta 0.1 to 20, `sde_lib.VPSDE`), the
probability-flow drift -1/2 beta(t) (x + score), the divergence as score_sde's
`get_div_fn` forms it (eps^T J eps with one probe per example, fixed over the
solve), the state as one flat vector of the batch's x and delta log p, SciPy's
`solve_ivp(method="RK45", rtol=1e-5, atol=1e-5)` from eps = 1e-5 to 1, the
N(0, I) prior and score_sde's bits/dim (offset log2(1/2) + 8 = 7 for data
centred to [-1, 1]). All in float64 NumPy, with no autodiff: the model is a
Gaussian mixture, whose score and Jacobian are written out here, so the
tests' forward-mode products are checked against formulas, not against
themselves. The mixture and test points are small (B = 4, D = 6).
"""

import os

import numpy as np
from scipy import integrate

BETA_MIN, BETA_MAX, EPS = 0.1, 20.0, 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))


def alpha_sigma2(t):
  log_alpha = -0.25 * t**2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN
  return np.exp(log_alpha), -np.expm1(2 * log_alpha)


def mixture_terms(x, t, means, scales, weights):
  """(score [D], Jacobian of the score [D, D]) of p_t for one point x [D]."""
  alpha, sigma2 = alpha_sigma2(t)
  var = alpha**2 * scales**2 + sigma2  # [K]
  diff = x[None, :] - alpha * means  # [K, D]
  dims = x.size
  log_n = -0.5 * dims * np.log(2 * np.pi * var) - 0.5 * np.sum(diff**2, -1) / var
  logits = np.log(weights) + log_n
  r = np.exp(logits - logits.max())
  r /= r.sum()
  g = -diff / var[:, None]  # [K, D] each component's score
  score = r @ g
  jac = (-np.sum(r / var) * np.eye(dims) + np.einsum("k,ki,kj->ij", r, g, g)
         - np.outer(score, score))
  return score, jac


def likelihood(x, probes, means, scales, weights, exact=False):
  """score_sde's likelihood_fn on the analytic model: (log p [B], delta [B], z [B, D], nfe)."""
  batch, dims = x.shape

  def ode_func(t, state):
    sample = state[:-batch].reshape(batch, dims)
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    drift, div = np.zeros_like(sample), np.zeros(batch)
    for b in range(batch):
      score, jac = mixture_terms(sample[b], t, means, scales, weights)
      drift[b] = -0.5 * beta * (sample[b] + score)
      jac_drift = -0.5 * beta * (np.eye(dims) + jac)
      div[b] = np.trace(jac_drift) if exact else probes[b] @ jac_drift @ probes[b]
    return np.concatenate([drift.reshape(-1), div])

  init = np.concatenate([x.reshape(-1), np.zeros(batch)])
  solution = integrate.solve_ivp(ode_func, (EPS, 1.0), init, rtol=1e-5, atol=1e-5, method="RK45")
  final = solution.y[:, -1]
  z, delta = final[:-batch].reshape(batch, dims), final[-batch:]
  prior = -dims / 2 * np.log(2 * np.pi) - np.sum(z**2, -1) / 2
  return prior + delta, delta, z, solution.nfev


def main():
  rng = np.random.RandomState(0)
  means = np.stack([np.linspace(-0.5, 0.5, 6), 0.4 * np.cos(np.arange(6.0))])  # [K, D]
  scales = np.array([0.3, 0.15])
  weights = np.array([0.6, 0.4])
  component = np.array([0, 1, 0, 1])
  x = means[component] + scales[component, None] * rng.standard_normal((4, 6))
  rademacher = rng.randint(0, 2, size=(4, 6)) * 2.0 - 1.0
  gaussian = rng.standard_normal((4, 6))
  out = dict(means=means, scales=scales, weights=weights, x=x, rademacher=rademacher,
             gaussian=gaussian)
  for name, probes, exact in (("rademacher", rademacher, False), ("gaussian", gaussian, False),
                              ("exact", None, True)):
    log_p, delta, z, nfe = likelihood(x, probes, means, scales, weights, exact)
    bpd = -log_p / np.log(2) / x.shape[1] + np.log2(0.5) + 8.0  # score_sde's offset
    out.update({f"{name}_log_p": log_p, f"{name}_delta": delta, f"{name}_z": z,
                f"{name}_nfe": np.int64(nfe), f"{name}_bpd": bpd})
    print(name, "log p", log_p, "nfe", nfe)
  np.savez(os.path.join(HERE, "references.npz"), **out)


if __name__ == "__main__":
  main()
