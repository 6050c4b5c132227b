"""FID, Inception Score, precision/recall and reference files: closed forms and the originals."""

import json
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from benchmarks import peers
from diffusion_jax.evaluation import metrics, reference
from diffusion_jax.evaluation.metrics import GaussianAccumulator

peers.import_torchvision()  # pytorch_fid and torch_fidelity import it


def _statistics(features):
  return GaussianAccumulator(features.shape[1]).update(features).statistics()


def _feature_sets(rank=None, n=3000, dim=64, seed=0):
  """Two feature sets [n, dim] of different mean and covariance; of rank `rank` if given."""
  rng = np.random.default_rng(seed)
  inner = dim if rank is None else rank
  mix1, mix2 = rng.normal(size=(inner, dim)), rng.normal(size=(inner, dim))
  first = rng.normal(size=(n, inner)) @ mix1 / np.sqrt(inner)
  second = rng.normal(size=(n, inner)) @ mix2 / np.sqrt(inner) * 0.7 + 0.3
  return first, second


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_diagonal_gaussians():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  std1, std2 = rng.uniform(0.1, 2, size=10), rng.uniform(0.1, 2, size=10)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(std1**2), mu2, np.diag(std2**2))
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_frechet_distance_of_full_covariances_against_sqrtm():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 8, 8))
  sigma1, sigma2 = a @ a.T + np.eye(8), b @ b.T + np.eye(8)  # well conditioned
  mu1, mu2 = rng.normal(size=(2, 8))
  expected = (
    np.sum((mu1 - mu2) ** 2)
    + np.trace(sigma1)
    + np.trace(sigma2)
    - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real)
  )
  np.testing.assert_allclose(
    metrics.frechet_distance(mu1, sigma1, mu2, sigma2), expected, rtol=1e-10
  )


@pytest.mark.parametrize("num", [2000, 40])  # 40 < 64: a singular covariance
def test_frechet_distance_of_a_set_with_itself_is_zero(num):
  features = np.random.default_rng(2).normal(size=(num, 64)) * np.linspace(0.1, 3, 64)
  mu, sigma = _statistics(features)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


@pytest.mark.parametrize("rank", [None, 20])
def test_frechet_distance_matches_pytorch_fid(rank):
  from pytorch_fid.fid_score import calculate_frechet_distance as original  # noqa: PLC0415

  first, second = _feature_sets(rank)
  stats = (*_statistics(first), *_statistics(second))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid passes sqrtm's `disp`.
    expected = original(*stats)
  np.testing.assert_allclose(metrics.frechet_distance(*stats), expected, rtol=1e-3)


def test_frechet_distance_names_the_mismatched_array():
  mu, sigma = np.zeros(64), np.eye(64)
  with pytest.raises(ValueError, match=r"mu2 has shape \(32,\), expected \(64,\)"):
    metrics.frechet_distance(mu, sigma, np.zeros(32), np.eye(32))
  with pytest.raises(ValueError, match="sigma1 has shape"):
    metrics.frechet_distance(mu, np.eye(32), mu, sigma)
  with pytest.raises(ValueError, match="mu1 must be a 1-D"):
    metrics.frechet_distance(sigma, sigma, mu, sigma)
  with pytest.raises(ValueError, match="sigma2 holds NaN"):
    metrics.frechet_distance(mu, sigma, mu, np.full((64, 64), np.nan))


# ----------------------------------------------------------------------------- accumulator


def test_accumulator_matches_numpy_over_uneven_batches():
  # float32 batches (as from the device), far from 0 where E[xx^T] - mu mu^T would cancel.
  features = (np.random.default_rng(3).normal(size=(1000, 24)) * 2 + 50).astype(np.float32)
  accumulator = GaussianAccumulator(24)
  for start, stop in [(0, 1), (1, 8), (8, 8), (8, 311), (311, 1000)]:
    accumulator.update(features[start:stop])
  mu, sigma = accumulator.statistics()
  assert accumulator.count == 1000
  exact = features.astype(np.float64)
  np.testing.assert_allclose(mu, exact.mean(axis=0), rtol=1e-13)
  np.testing.assert_allclose(sigma, np.cov(exact, rowvar=False), rtol=1e-11, atol=1e-12)


def test_merged_accumulators_equal_one():
  features = np.random.default_rng(4).normal(size=(500, 16))
  whole = GaussianAccumulator(16).update(features).statistics()
  left = GaussianAccumulator(16).update(features[:123])
  right = GaussianAccumulator(16).update(features[123:300]).update(features[300:])
  for merged in (
    left.merge(right),
    right.merge(left),
    left.merge(right).merge(GaussianAccumulator(16)),
  ):
    assert merged.count == 500
    for got, expected in zip(merged.statistics(), whole):
      np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
  assert left.count == 123  # merging leaves both inputs as they were


def test_accumulator_rejects_wrong_shapes_and_too_few_features():
  with pytest.raises(ValueError, match=r"\[B, 16\], got \(4, 8\)"):
    GaussianAccumulator(16).update(np.zeros((4, 8)))
  with pytest.raises(ValueError, match="at least 2"):
    GaussianAccumulator(16).update(np.zeros((1, 16))).statistics()
  with pytest.raises(ValueError, match="16 and 8"):
    GaussianAccumulator(16).merge(GaussianAccumulator(8))


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_of_confident_even_predictions_is_the_class_count():
  classes, splits = 8, 5
  labels = np.tile(np.arange(classes), splits * 3)  # every split holds every class 3 times
  logits = 1000.0 * np.eye(classes)[labels]
  mean, std = metrics.inception_score(logits, splits=splits)
  np.testing.assert_allclose([mean, std], [classes, 0.0], atol=1e-9)


def test_inception_score_of_identical_predictions_is_one():
  logits = np.tile(np.random.default_rng(5).normal(size=(1, 1008)), (100, 1))
  np.testing.assert_allclose(metrics.inception_score(logits), [1.0, 0.0], atol=1e-12)


def test_inception_score_matches_torch_fidelity():
  from torch_fidelity.metric_isc import isc_features_to_metric as original  # noqa: PLC0415

  logits = np.random.default_rng(6).normal(size=(1003, 1008)).astype(np.float32) * 4
  expected = original(torch.from_numpy(logits), splits=10, shuffle=False)
  mean, std = metrics.inception_score(logits, splits=10)
  np.testing.assert_allclose(mean, expected["inception_score_mean"], rtol=1e-3)
  np.testing.assert_allclose(std, expected["inception_score_std"], rtol=1e-3)
  assert std > 0


def test_inception_score_rejects_bad_splits():
  with pytest.raises(ValueError, match="splits"):
    metrics.inception_score(np.zeros((5, 10)), splits=6)


# ----------------------------------------------------------------------------- precision/recall


def _brute_force_precision_recall(real, fake, k):
  """Precision and recall from full float64 distance matrices."""

  def radii(points):  # the k-th nearest other point: column k of the sorted distances
    return np.sort(np.sum((points[:, None] - points[None]) ** 2, -1), axis=1)[:, k]

  def covered(queries, points, point_radii):
    distances = np.sum((queries[:, None] - points[None]) ** 2, -1)
    return np.mean(np.any(distances <= point_radii[None], axis=1))

  return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_of_identical_and_of_disjoint_sets():
  features = np.random.default_rng(7).normal(size=(200, 16))
  assert metrics.precision_recall(features, features, k=3) == (1.0, 1.0)
  assert metrics.precision_recall(features, features + 100.0, k=3) == (0.0, 0.0)


def test_a_sample_on_a_ball_surface_counts_as_inside():
  # Integer points, exact in float32: with k=1 each real ball has radius 2, and
  # the fake points -2 and 8 lie exactly on the surfaces of the balls of 0 and 6.
  real = np.array([[0.0], [2.0], [4.0], [6.0]])
  fake = np.array([[-2.0], [8.0]])
  assert metrics.precision_recall(real, fake, k=1) == (1.0, 1.0)


def test_precision_recall_of_samples_that_miss_half_the_modes():
  rng = np.random.default_rng(8)
  modes = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
  real = (modes[:, None] + rng.normal(size=(4, 250, 2))).reshape(-1, 2)
  fake = (modes[:2, None] + rng.normal(size=(2, 250, 2))).reshape(-1, 2)
  precision, recall = metrics.precision_recall(real, fake, k=3)
  assert precision > 0.95
  assert 0.45 < recall <= 0.5


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force_and_torch_fidelity(k):
  rng = np.random.default_rng(9)
  real = rng.normal(size=(300, 16))
  fake = rng.normal(size=(250, 16)) * 1.3 + 0.4
  expected = _brute_force_precision_recall(real, fake, k)
  assert 0.05 < min(expected) and max(expected) < 0.99  # neither metric saturated
  got = metrics.precision_recall(real, fake, k=k, block_size=64)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
  from torch_fidelity.metric_prc import calculate_precision_recall_full as original  # noqa: PLC0415

  # torch-fidelity's first argument is the generated set.
  np.testing.assert_allclose(
    got, original(torch.from_numpy(fake), torch.from_numpy(real), neighborhood=k), atol=1e-12
  )


def test_precision_recall_does_not_depend_on_the_block_size():
  rng = np.random.default_rng(10)
  real, fake = rng.normal(size=(400, 32)), rng.normal(size=(350, 32)) * 1.2
  small_blocks = metrics.precision_recall(real, fake, k=3, block_size=7)
  assert small_blocks == metrics.precision_recall(real, fake, k=3, block_size=1000)
  assert 0 < small_blocks[0] < 1 and 0 < small_blocks[1] < 1


def test_precision_recall_rejects_bad_inputs():
  features = np.zeros((10, 4))
  with pytest.raises(ValueError, match="fake_features has 3 points; k=3"):
    metrics.precision_recall(features, features[:3], k=3)
  with pytest.raises(ValueError, match="4-dim, fake_features 5-dim"):
    metrics.precision_recall(features, np.zeros((10, 5)))


# ----------------------------------------------------------------------------- reference files


def _full_stats(dim=8, spatial_dim=6):
  rng = np.random.default_rng(11)
  pool = GaussianAccumulator(dim).update(rng.normal(size=(30, dim)))
  spatial = GaussianAccumulator(spatial_dim).update(rng.normal(size=(30, spatial_dim)))
  return reference.ReferenceStats.from_accumulators(
    pool,
    spatial,
    features=rng.normal(size=(12, dim)).astype(np.float32),
    source={"dataset": "cifar10", "split": "train", "weights_sha256": "ab" * 32},
  )


def test_reference_round_trip(tmp_path):
  stats = _full_stats()
  path = str(tmp_path / "ref" / "cifar10.npz")
  reference.save_reference(path, stats)
  loaded = reference.load_reference(path)
  for key in ("mu", "sigma", "mu_s", "sigma_s", "features"):
    np.testing.assert_array_equal(getattr(loaded, key), getattr(stats, key))
  assert loaded.features.dtype == np.float32
  assert (loaded.num_images, loaded.source, loaded.path) == (30, stats.source, path)
  assert loaded.images is None
  assert os.listdir(tmp_path / "ref") == ["cifar10.npz"]  # no temporary file left


def test_interrupted_save_leaves_the_earlier_file(tmp_path, monkeypatch):
  path = str(tmp_path / "ref.npz")
  reference.save_reference(path, _full_stats())

  def savez_that_dies(file, **arrays):
    with open(file, "wb") as f:
      f.write(b"PK half a file")
    raise KeyboardInterrupt

  monkeypatch.setattr(np, "savez", savez_that_dies)
  with pytest.raises(KeyboardInterrupt):
    reference.save_reference(path, _full_stats(dim=4))
  monkeypatch.undo()
  assert reference.load_reference(path).mu.shape == (8,)
  assert os.listdir(tmp_path) == ["ref.npz"]


def test_pytorch_fid_statistics_load(tmp_path):
  path = str(tmp_path / "fid_stats.npz")
  mu, sigma = _statistics(np.random.default_rng(12).normal(size=(20, 5)))
  np.savez(path, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
  loaded = reference.load_reference(path)
  np.testing.assert_allclose(loaded.sigma, sigma, rtol=1e-6)
  assert loaded.sigma.dtype == np.float64
  assert (loaded.mu_s, loaded.features, loaded.images, loaded.num_images, loaded.source) == (
    None,
    None,
    None,
    None,
    {},
  )


def test_adm_reference_batch_loads(tmp_path):
  path = str(tmp_path / "VIRTUAL_tiny.npz")
  rng = np.random.default_rng(13)
  images = rng.integers(0, 256, size=(7, 4, 4, 3), dtype=np.uint8)
  mu, sigma = _statistics(rng.normal(size=(20, 5)))
  mu_s, sigma_s = _statistics(rng.normal(size=(20, 3)))
  np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  loaded = reference.load_reference(path)
  np.testing.assert_array_equal(loaded.images, images)
  np.testing.assert_array_equal(loaded.sigma_s, sigma_s)
  assert loaded.num_images == 7
  assert reference.load_reference(path, load_images=False).images is None
  reference.check_dimension(loaded, 5, spatial_dim=3)


def test_bad_reference_files_name_the_path_and_key(tmp_path):
  missing = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    reference.load_reference(missing)
  text = tmp_path / "notes.npz"
  text.write_text("not a zip")
  with pytest.raises(ValueError, match=f"{text} is not an .npz"):
    reference.load_reference(str(text))
  single = str(tmp_path / "single.npy")
  np.save(single, np.zeros(3))
  with pytest.raises(ValueError, match="single array"):
    reference.load_reference(single)
  cases = {
    "no_sigma": dict(mu=np.zeros(4)),
    "mu_2d": dict(mu=np.zeros((4, 1)), sigma=np.eye(4)),
    "sigma_shape": dict(mu=np.zeros(4), sigma=np.eye(3)),
    "sigma_s_shape": dict(mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(2), sigma_s=np.eye(3)),
    "features_dim": dict(mu=np.zeros(4), sigma=np.eye(4), features=np.zeros((5, 3))),
  }
  messages = {
    "no_sigma": "has no 'sigma' array",
    "mu_2d": "mu must be a 1-D",
    "sigma_shape": r"sigma has shape \(3, 3\), expected \(4, 4\)",
    "sigma_s_shape": "sigma_s has shape",
    "features_dim": "features has shape",
  }
  for name, arrays in cases.items():
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, **arrays)
    with pytest.raises(
      ValueError,
      match=f"reference {path}: {messages[name]}"
      if name != "no_sigma"
      else f"reference {path} {messages[name]}",
    ):
      reference.load_reference(path)


def test_check_dimension_gives_one_clear_error(tmp_path):
  path = str(tmp_path / "small.npz")
  reference.save_reference(path, _full_stats(dim=64))
  stats = reference.load_reference(path)
  reference.check_dimension(stats, 64, spatial_dim=6)
  with pytest.raises(
    ValueError, match=f"reference {path} has 64-dim statistics, the features are 2048-dim"
  ):
    reference.check_dimension(stats, 2048)
  with pytest.raises(
    ValueError, match="6-dim spatial statistics, the spatial features are 2023-dim"
  ):
    reference.check_dimension(stats, 64, spatial_dim=2023)
  pool_only = reference.ReferenceStats(mu=stats.mu, sigma=stats.sigma)
  with pytest.raises(ValueError, match="in-memory reference has no spatial statistics"):
    reference.check_dimension(pool_only, 64, spatial_dim=2023)


def test_source_metadata_is_json_in_the_file(tmp_path):
  path = str(tmp_path / "ref.npz")
  reference.save_reference(path, _full_stats())
  with np.load(path, allow_pickle=False) as npz:
    assert json.loads(str(npz["source"]))["dataset"] == "cifar10"
    assert set(npz.files) == {"mu", "sigma", "mu_s", "sigma_s", "features", "num_images", "source"}
