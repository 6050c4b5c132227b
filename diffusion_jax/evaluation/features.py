"""Feature networks of the sample metrics, and the statistics of an image set's features.

Two networks: the FID Inception-v3 (`fid`, `is`, `sfid`, `precision_recall`)
and the small digits classifier of the offline evaluation (`fd_digits`,
`is_digits`). Each maps uint8 images [N, H, W, C] to {"pool" [N, D],
"logits" [N, K]} (and "spatial" for Inception); `summarize` streams any
number of images through one and keeps what the metrics need.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import numpy as np
import tqdm

from diffusion_jax import files, weightfiles
from diffusion_jax.evaluation import digits_classifier, inception, metrics
from diffusion_jax.evaluation.config import EvalConfig

# Metric -> (the network it runs on, the formula): fd = Fréchet distance of pool
# features, sfd = of spatial features, is = Inception Score, pr = precision/recall.
METRIC_KINDS = {
    "fid": ("inception", "fd"), "is": ("inception", "is"), "sfid": ("inception", "sfd"),
    "precision_recall": ("inception", "pr"),
    "fd_digits": ("digits_classifier", "fd"), "is_digits": ("digits_classifier", "is"),
}


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """A feature network: `extract(uint8 [N, H, W, C]) -> {"pool", "logits"[, "spatial"]}`."""

  name: str  # "inception" or "digits_classifier"
  extract: Callable[[np.ndarray], dict[str, np.ndarray]]
  pool_dim: int
  spatial_dim: int | None  # None: no spatial features (no sFID)
  info: dict  # what the report records: weights file, SHA-256, resize mode, ...


def load_inception_net(config: EvalConfig) -> FeatureNet:
  """The FID Inception from the configured weights file, its SHA-256 checked against the published one.

  Raises:
    FileNotFoundError: no weights file configured, or it does not exist.
    ValueError: the file's SHA-256 does not start with `config.inception_sha256_prefix`,
      or its keys or shapes are not the FID Inception's (each named).
  """
  path = config.weights_path()
  digest = weightfiles.sha256(path)
  prefix = config.inception_sha256_prefix
  if prefix and not digest.startswith(prefix):
    raise ValueError(
        f"Inception weights {path} have SHA-256 {digest}, but the published"
        f" {inception.WEIGHTS_FILE}'s begins with {prefix}: a FID from other weights is not"
        " comparable with published numbers. Use the published file, or set"
        " --config.inception_sha256_prefix='' to evaluate with these weights anyway.")
  variables = inception.load_inception(path)
  extract = functools.partial(inception.inception_features, variables, resize=config.resize,
                              batch_size=config.feature_batch_size)
  spatial_dim = 17 * 17 * inception.SPATIAL_CHANNELS
  return FeatureNet("inception", extract, inception.POOL_FEATURES, spatial_dim, {
      "weights": path, "sha256": digest, "resize": config.resize,
      "published_weights": digest.startswith(inception.WEIGHTS_SHA256_PREFIX)})


def load_digits_net(config: EvalConfig) -> FeatureNet:
  """The digits classifier, trained on the digits' train split on first use and cached."""
  params = digits_classifier.load_or_train()
  extract = functools.partial(digits_classifier.digits_features, params,
                              batch_size=config.feature_batch_size)
  return FeatureNet("digits_classifier", extract, digits_classifier.FEATURE_DIM, None,
                    {"network": "digits_classifier", "trained_on": "digits train split",
                     "cache": files.default_cache_dir()})


LOADERS = {"inception": load_inception_net, "digits_classifier": load_digits_net}


@dataclasses.dataclass
class FeatureSummary:
  """What the metrics need of an image set's features, gathered in one pass."""

  pool: metrics.GaussianAccumulator
  spatial: metrics.GaussianAccumulator | None
  logits: np.ndarray  # [N, K], for the Inception Score's splits
  pool_features: np.ndarray | None  # [N, D], kept for precision/recall only

  @property
  def count(self) -> int:
    return self.pool.count


def summarize(net: FeatureNet, image_batches: Iterable[np.ndarray], *, keep_pool: bool,
              total: int | None = None, desc: str = "features") -> FeatureSummary:
  """Streams uint8 image batches [B, H, W, C] through `net` (progress bar over `total` images)."""
  pool = metrics.GaussianAccumulator(net.pool_dim)
  spatial = metrics.GaussianAccumulator(net.spatial_dim) if net.spatial_dim else None
  logits, kept = [], []
  with tqdm.tqdm(total=total, desc=desc, unit="img") as progress:
    for images in image_batches:
      features = net.extract(images)
      pool.update(features["pool"])
      if spatial is not None:
        spatial.update(features["spatial"])
      logits.append(features["logits"])
      if keep_pool:
        kept.append(features["pool"])
      progress.update(len(images))
  return FeatureSummary(pool, spatial, np.concatenate(logits),
                        np.concatenate(kept) if keep_pool else None)


def chunks(images: np.ndarray, size: int):
  """Consecutive slices of `size` images (the last may be shorter)."""
  return (images[i:i + size] for i in range(0, len(images), size))
