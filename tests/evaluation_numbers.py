"""How far two evaluations of the same run may differ, when they split the work differently.

Both are launch.evaluate of configs/eval/digits.py:smoke: one as 1 process x 4
fake CPU devices, the other as 2 processes x 2 (gloo collectives). The
processes exchange float64 statistics bit for bit (tests/test_evaluate_hosts.py),
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

import pytest

from diffusion_jax.evaluation import nll

REL_TOLERANCE = 1e-6
FD_TOLERANCE = 1e-4
STATS_TOLERANCE = 1e-6


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
