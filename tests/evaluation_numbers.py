"""What the evaluation's numbers must be, and how far two evaluations of one run may differ.

What they must be: the metrics recomputed from feature arrays by their
textbook formulas in NumPy and SciPy, independent of
diffusion_jax.evaluation.metrics (whose Fréchet distance uses symmetric
eigendecompositions, its Inception Score log probabilities, its
precision/recall blocked float32 distances in JAX): `frechet_distance`,
`inception_score`, `precision_recall`, and `digits_scores` of images through
the digits classifier. `assert_scores_are` compares a report with them:
- the Fréchet distances within EXACT_FD_TOLERANCE. The test's features
  (`digits_classifier.digits_features`, `inception.inception_features`) may
  differ from the evaluation's in their last float32 bits (other batch shapes
  and device layouts), and scipy's `sqrtm` of a singular covariance product
  (dead ReLU units; fewer images than dimensions) is accurate to ~sqrt(eps):
  measured 1.4e-6 on the digits' real floor, 1e-7 on the smoke samples, 9e-9
  on Inception's features;
- the Inception Score (± std) within REL_TOLERANCE (measured 3e-14);
- precision and recall, fractions of a few images, exactly: float64 distances
  here and float32 there agree on every membership unless a point lies within
  round-off of a ball's surface (a test's images must have none there).
A wrong formula moves them by far more (measured: a biased, ddof 0 covariance
by 7e-4 of the FID and 2e-3 of fd_digits; the marginal taken of the logits by
7e-4 of the Inception Score; a trace dropped, chunks cut another way, another
k by more).

How far two evaluations may differ, when they split the work differently: both
are launch.evaluate of configs/eval/digits.py:smoke, one as 1 process x 4 fake
CPU devices, the other as 2 processes x 2 (gloo collectives). The processes
exchange float64 statistics bit for bit (tests/test_evaluate_hosts.py),
but the features are float32, and XLA:CPU may round a device's share
differently when 4 devices share one process than when 2 do (measured: some
reference features differ in their last bits). What each number may differ by:
- the reference split's mean and covariance: STATS_TOLERANCE of their largest
  entry (float32 round-off of the features; measured 5e-16 in one run, 2e-8 in
  another: the 2-process features are not always the same bits);
- the Fréchet distances: FD_TOLERANCE. The digits classifier's 64 ReLU
  features have dead units and the 20 samples span 19 dimensions, so the
  covariances are singular; the distance takes square roots of their near-zero
  eigenvalues, which turns round-off e into ~sqrt(e) (measured up to 1.9e-5 on
  the samples, 3.3e-7 on the real floor);
- the Inception Score's formula and the NLL: REL_TOLERANCE (float32 logits
  and bounds of the same images and examples; measured: identical bits).
A layout bug (an image counted twice or not at all, the logits out of order, an
example with another example's noise) moves these numbers by ~1e-3 or more.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.special

from diffusion_jax.evaluation import digits_classifier, nll

REL_TOLERANCE = 1e-6
FD_TOLERANCE = 1e-4
STATS_TOLERANCE = 1e-6
EXACT_FD_TOLERANCE = 1e-5
PR_K = 3  # Kynkäänniemi et al. 2019's neighbourhood size, as the ADM evaluator's


def frechet_distance(features, mu, sigma) -> float:
  """d² = |m - mu|² + tr(S) + tr(sigma) - 2 tr((S sigma)^½) of features [N, D] (mean m,
  covariance S, ddof 1) against N(mu [D], sigma [D, D]), in float64.

  The square root is scipy.linalg.sqrtm's of the covariance product. With N <= D
  images, S = Xᵀ X / (N - 1) for the centred features X [N, D], and S sigma has
  the nonzero eigenvalues of X sigma Xᵀ / (N - 1) [N, N]: the root's trace is
  taken of that product, seconds where Inception's [2048, 2048] takes minutes.
  """
  features = np.asarray(features, np.float64)
  sigma = np.asarray(sigma, np.float64)
  centred = features - features.mean(axis=0)
  covariance = np.cov(features, rowvar=False)
  if len(features) <= features.shape[1]:
    product = centred @ sigma @ centred.T / (len(features) - 1)
  else:
    product = covariance @ sigma
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular: dead units, N < D
    trace_root = np.trace(scipy.linalg.sqrtm(product)).real
  offset = features.mean(axis=0) - np.asarray(mu, np.float64)
  return float(offset @ offset + np.trace(covariance) + np.trace(sigma) - 2 * trace_root)


def inception_score(logits, splits: int) -> tuple[float, float]:
  """(mean, std) over `splits` consecutive chunks (bounds floor(i N / splits)) of
  exp(mean_x KL(p(y|x) || p(y))), p(y) the chunk's mean of the softmax of logits [N, C]."""
  probabilities = scipy.special.softmax(np.asarray(logits, np.float64), axis=1)
  num = len(probabilities)
  scores = []
  for i in range(splits):
    chunk = probabilities[i * num // splits : (i + 1) * num // splits]
    kl = scipy.special.rel_entr(chunk, chunk.mean(axis=0)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def precision_recall(real, fake, k: int = PR_K) -> tuple[float, float]:
  """(precision, recall) of fake [F, D] against real [R, D] features: a point is in a set's
  manifold if within (<=) the distance from some member to that member's k-th nearest other
  member; all pairwise distances in float64."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  distance = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))

  def radii(points):
    own = distance(points, points)
    np.fill_diagonal(own, np.inf)
    return np.sort(own, axis=1)[:, k - 1]

  precision = np.mean((distance(fake, real) <= radii(real)).any(axis=1))
  recall = np.mean((distance(real, fake) <= radii(fake)).any(axis=1))
  return float(precision), float(recall)


def digits_scores(images, reference_images, is_splits: int) -> dict:
  """fd_digits against reference_images and is_digits (± std) of uint8 digits [N, 8, 8, 1]."""
  params = digits_classifier.load_or_train()
  features = digits_classifier.digits_features(params, images)
  reference = digits_classifier.digits_features(params, reference_images)["pool"]
  reference = reference.astype(np.float64)
  score, spread = inception_score(features["logits"], is_splits)
  return {
    "fd_digits": frechet_distance(
      features["pool"], reference.mean(axis=0), np.cov(reference, rowvar=False)
    ),
    "is_digits": score,
    "is_digits_std": spread,
  }


def assert_scores_are(*comparisons: tuple[str, dict, dict]) -> None:
  """Each (name, a report's scores, the recomputed ones) agrees: Fréchet distances within
  EXACT_FD_TOLERANCE, Inception Scores within REL_TOLERANCE, precision and recall exactly.
  A failure names every score that differs, with both values."""
  wrong = {}
  for name, scores, expected in comparisons:
    for metric, value in expected.items():
      if scores[metric] != pytest.approx(value, rel=_tolerance(metric), abs=0):
        wrong[f"{name} {metric}"] = {"report": scores[metric], "formula": value}
  assert not wrong, wrong


def _tolerance(metric: str) -> float:
  if metric in ("precision", "recall"):
    return 0.0
  return EXACT_FD_TOLERANCE if metric in ("fd_digits", "fid", "sfid") else REL_TOLERANCE


def assert_same_scores(scores: dict, expected: dict, where: str) -> None:
  """fd_digits and is_digits (± std) of one image set in two reports, within the tolerances."""
  assert scores["fd_digits"] == pytest.approx(expected["fd_digits"], rel=FD_TOLERANCE), where
  for metric in ("is_digits", "is_digits_std"):
    assert scores[metric] == pytest.approx(expected[metric], rel=REL_TOLERANCE), (where, metric)


def assert_same_numbers(report: dict, expected: dict) -> None:
  """Every metric of two digits evaluation reports (samples, real floor, NLL) agrees."""
  assert_same_scores(report["runs"][0], expected["runs"][0], "samples")
  assert_same_scores(report["real_floor"], expected["real_floor"], "real_floor")
  for part in nll.PARTS:
    assert report["nll"][part] == pytest.approx(expected["nll"][part], rel=REL_TOLERANCE), part
  assert report["nll"]["num_examples"] == expected["nll"]["num_examples"]
  assert report["runs"][0]["num_samples"] == expected["runs"][0]["num_samples"]
