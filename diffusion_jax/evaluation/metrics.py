"""Sample-quality metrics on Inception features: FID, sFID, Inception Score, precision/recall.

Every function takes feature arrays (from `evaluation.inception` or any other
network), so the metrics know nothing of images or of the network:

* FID (Heusel et al. 2017): `frechet_distance` between the Gaussian statistics
  (`GaussianAccumulator`) of the `pool` features [N, 2048] of samples and of a
  reference set.
* sFID (Nash et al. 2021, as in Dhariwal & Nichol 2021's evaluator): the same
  `frechet_distance`, on the statistics of the `spatial` features [N, 2023]
  (the first 7 channels of mixed_6/conv); it needs no function of its own.
* Inception Score (Salimans et al. 2016): `inception_score` of the logits [N, 1008].
* Improved precision and recall (Kynkäänniemi et al. 2019): `precision_recall`
  of the `pool` features, computed in blocks so no N x N matrix is ever held.

Statistics are accumulated and compared in float64 on the host; the pairwise
distances of precision/recall are computed by jitted JAX functions in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


class GaussianAccumulator:
  """Streaming mean and covariance of feature batches, in float64.

  Keeps the count, the mean and the centred scatter matrix sum_i (x_i - mean)(x_i - mean)^T,
  combined batch by batch with the parallel update of Chan et al. (1979). This costs
  one [D, B] x [B, D] product per batch, as a raw sum of outer products would, and
  avoids the cancellation of E[xx^T] - mean mean^T.
  """

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self.mean = np.zeros([dim], np.float64)
    self.scatter = np.zeros([dim, dim], np.float64)

  @classmethod
  def from_moments(cls, count: int, mean: np.ndarray, scatter: np.ndarray) -> GaussianAccumulator:
    """The accumulator of `count` features with this mean [D] and centred scatter matrix [D, D]."""
    accumulator = cls(len(mean))
    accumulator._combine(count, np.asarray(mean, np.float64), np.asarray(scatter, np.float64))
    return accumulator

  def update(self, features) -> GaussianAccumulator:
    """Adds a batch of features [B, D] (NumPy or JAX, any float dtype); returns self."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[1] != self.dim:
      raise ValueError(f"Expected features of shape [B, {self.dim}], got {features.shape}.")
    if features.shape[0]:
      batch_mean = features.mean(axis=0)
      centred = features - batch_mean
      self._combine(features.shape[0], batch_mean, centred.T @ centred)
    return self

  def merge(self, other: GaussianAccumulator) -> GaussianAccumulator:
    """A new accumulator holding the features of both (e.g. of two hosts or shards)."""
    if other.dim != self.dim:
      raise ValueError(f"Cannot merge accumulators of dimension {self.dim} and {other.dim}.")
    merged = GaussianAccumulator(self.dim)
    merged._combine(self.count, self.mean, self.scatter)
    merged._combine(other.count, other.mean, other.scatter)
    return merged

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]): the mean and the unbiased (ddof=1) covariance, as np.cov."""
    if self.count < 2:
      raise ValueError(f"A covariance needs at least 2 feature vectors, got {self.count}.")
    return self.mean.copy(), self.scatter / (self.count - 1)

  def _combine(self, count: int, mean: np.ndarray, scatter: np.ndarray):
    if not count:
      return
    total = self.count + count
    delta = mean - self.mean
    self.scatter += scatter + np.outer(delta, delta * (self.count * count / total))
    self.mean += delta * (count / total)
    self.count = total


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

  d² = ||mu1 - mu2||² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½)
  (Dowson & Landau 1982),
  with tr((sigma1 sigma2)^½) = tr((A sigma2 A)^½) for A = sigma1^½: the square root
  of a symmetric PSD matrix, whose trace is the sum of the square roots of its
  eigenvalues. Both come from symmetric eigendecompositions in float64 (eigenvalues
  below 0 from round-off are clipped), which stays stable where scipy's `sqrtm` of
  the non-symmetric sigma1 sigma2 is not.

  Args:
    mu1, mu2: means [D].
    sigma1, sigma2: covariances [D, D].

  Returns:
    The distance; FID when the statistics are of Inception `pool` features,
    sFID when they are of `spatial` features.
  """
  mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
  _check_gaussian(mu1, sigma1, mu2, sigma2)
  eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
  sqrt_sigma1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
  product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
  product_eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
  trace_sqrt_product = np.sqrt(np.clip(product_eigenvalues, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)


def _check_gaussian(mu1, sigma1, mu2, sigma2):
  """Raises a ValueError naming the array whose shape does not fit mu1 [D]."""
  if mu1.ndim != 1:
    raise ValueError(f"mu1 must be a 1-D mean [D], got shape {mu1.shape}.")
  dim = mu1.shape[0]
  for name, array, shape in (
    ("sigma1", sigma1, (dim, dim)),
    ("mu2", mu2, (dim,)),
    ("sigma2", sigma2, (dim, dim)),
  ):
    if array.shape != shape:
      raise ValueError(
        f"{name} has shape {array.shape}, expected {shape} to match mu1 of dimension {dim}."
      )
  for name, array in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(array)):
      raise ValueError(f"{name} holds NaN or infinite values.")


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))).

  As the original code (openai/improved-gan) computes it: the N predictions are
  cut, in order and without shuffling, into `splits` consecutive chunks with
  bounds floor(i N / splits); each chunk gives a score with its own marginal p(y).

  Args:
    logits: [N, C] class logits (C = 1008 for the FID Inception), any float dtype;
      the softmax is taken in float64.
    splits: number of chunks.

  Returns:
    (mean, standard deviation) of the per-chunk scores.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"Expected logits of shape [N, C], got {logits.shape}.")
  num = logits.shape[0]
  if not 1 <= splits <= num:
    raise ValueError(f"splits must lie in [1, N={num}], got {splits}.")
  log_p = logits - _logsumexp(logits, axis=1)  # log p(y|x) [N, C]
  scores = []
  for i in range(splits):
    chunk = log_p[i * num // splits : (i + 1) * num // splits]
    log_marginal = _logsumexp(chunk, axis=0) - np.log(chunk.shape[0])  # log p(y) [1, C]
    kl = np.sum(np.exp(chunk) * (chunk - log_marginal), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
  peak = x.max(axis=axis, keepdims=True)
  return peak + np.log(np.exp(x - peak).sum(axis=axis, keepdims=True))


# ----------------------------------------------------------------------------- precision/recall


def precision_recall(
  real_features, fake_features, k: int = 3, block_size: int = 1024
) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019), as Dhariwal & Nichol's evaluator.

  Each set is a union of balls around its points, of radius the distance to the
  point's k-th nearest neighbour in its own set. Precision is the fraction of fake
  samples inside the real balls; recall the fraction of real samples inside the
  fake balls. A point on a ball's surface counts as inside.

  Args:
    real_features: [N_real, D] reference features (Inception `pool`).
    fake_features: [N_fake, D] features of samples.
    k: neighbourhood size (3 in the paper and the ADM evaluator).
    block_size: rows of each [block_size, N] distance block; memory grows with it.

  Returns:
    (precision, recall), each in [0, 1].
  """
  real, fake = _check_feature_sets(real_features, fake_features, k)
  real_radii = knn_radii(real, k, block_size)
  fake_radii = knn_radii(fake, k, block_size)
  precision = fraction_in_manifold(fake, real, real_radii, block_size)
  recall = fraction_in_manifold(real, fake, fake_radii, block_size)
  return precision, recall


def knn_radii(features, k: int = 3, block_size: int = 1024) -> np.ndarray:
  """Squared distance of each point of features [N, D] to its k-th nearest other point: [N]."""
  if not 1 <= k < len(features):
    raise ValueError(f"k must lie in [1, N={len(features)}), got {k}.")
  points = _centred_float32(features, features)
  radii = [
    _kth_smallest_squared_distance(block, points, k) for block in _blocks(points, block_size)
  ]
  return np.concatenate(radii)[: points.shape[0]]


def fraction_in_manifold(
  queries, manifold_features, manifold_radii, block_size: int = 1024
) -> float:
  """Fraction of queries [Q, D] within the ball of at least one of manifold_features [M, D].

  manifold_radii: [M] squared radii, from `knn_radii(manifold_features, k)`.
  """
  points = _centred_float32(manifold_features, manifold_features)
  queries = _centred_float32(queries, manifold_features)
  radii = jnp.asarray(manifold_radii, jnp.float32)
  inside = [_within_any_ball(block, points, radii) for block in _blocks(queries, block_size)]
  return float(np.mean(np.concatenate(inside)[: queries.shape[0]]))


def _check_feature_sets(real, fake, k: int) -> tuple[np.ndarray, np.ndarray]:
  real, fake = np.asarray(real), np.asarray(fake)
  for name, features in (("real_features", real), ("fake_features", fake)):
    if features.ndim != 2:
      raise ValueError(f"{name} must be [N, D], got shape {features.shape}.")
    if features.shape[0] <= k:
      raise ValueError(f"{name} has {features.shape[0]} points; k={k} needs more than k.")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real_features are {real.shape[1]}-dim, fake_features {fake.shape[1]}-dim.")
  return real, fake


def _centred_float32(features, reference) -> jax.Array:
  """features - mean(reference) as float32 on the device.

  Distances do not change under a shift; centring makes the norms in
  ||a||² - 2ab + ||b||² small, so float32 loses fewer digits to cancellation.
  """
  centre = np.mean(reference, axis=0, dtype=np.float64).astype(np.float32)
  return jnp.asarray(features, jnp.float32) - centre


def _blocks(rows: jax.Array, block_size: int):
  """Yields [block_size, D] blocks of rows, the last padded with zeros (one compiled shape)."""
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}.")
  block_size = min(block_size, rows.shape[0])
  for start in range(0, rows.shape[0], block_size):
    block = rows[start : start + block_size]
    yield jnp.pad(block, ((0, block_size - block.shape[0]), (0, 0)))


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """||a_i - b_j||² [A, B] of a [A, D] and b [B, D], clipped at 0 against round-off."""
  cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  squared = jnp.sum(a * a, axis=1)[:, None] - 2 * cross + jnp.sum(b * b, axis=1)[None, :]
  return jnp.maximum(squared, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_smallest_squared_distance(block: jax.Array, points: jax.Array, k: int) -> jax.Array:
  """[block] squared distance to the k-th nearest of points [N, D], excluding the row itself.

  That is the (k+1)-th smallest, as the row itself, at distance 0, is among the points.
  """
  neg_smallest, _ = jax.lax.top_k(-_squared_distances(block, points), k + 1)
  return -neg_smallest[:, k]


@jax.jit
def _within_any_ball(block: jax.Array, points: jax.Array, radii: jax.Array) -> jax.Array:
  """[block] bool: whether each row lies within (<=) the squared radius of some point."""
  return jnp.any(_squared_distances(block, points) <= radii[None, :], axis=1)
