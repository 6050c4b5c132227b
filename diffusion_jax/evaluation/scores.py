"""The registry of sample metrics: each one's feature network, what it keeps, and its formula.

    scores = METRICS["fid"].compute(summary, reference, net, config, "fid")  # {"fid": 3.2}

A metric reads one image set's `features.FeatureSummary` and the reference's
statistics under the same network. Its name and network are also listed,
without JAX, in `config/evaluation.py`'s METRIC_NETWORKS (what a config may
ask for); tests/test_evaluate.py checks that the two agree. A new metric is
one function here, one line in METRICS and one in METRIC_NETWORKS.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from diffusion_jax.config.evaluation import METRIC_NETWORKS, EvalConfig
from diffusion_jax.evaluation import features, metrics, reference

# (the set's summary, the reference, the network, the config, the metric's name) -> scores
Compute = Callable[
  [features.FeatureSummary, reference.ReferenceStats, features.FeatureNet, EvalConfig, str],
  dict[str, float],
]


@dataclasses.dataclass(frozen=True)
class Metric:
  """A sample metric: what `features.summarize` must keep for it, and how it is computed."""

  keeps_logits: bool  # the logits of every image (the Inception Score's splits)
  keeps_pool: bool  # the pool features of every image, and of the reference (precision/recall)
  compute: Compute
  uses_spatial: bool = False  # the spatial features' statistics, the reference's too (sFID)


def frechet_distance(summary, ref, net, config, name) -> dict[str, float]:
  """FID (Heusel et al. 2017) on the pool features: ||mu - mu_r||^2 + Tr(S + S_r - 2 (S S_r)^1/2)."""
  del net, config
  return {name: metrics.frechet_distance(*summary.pool.statistics(), ref.mu, ref.sigma)}


def spatial_frechet_distance(summary, ref, net, config, name) -> dict[str, float]:
  """sFID (Nash et al. 2021): the Fréchet distance of the spatial features."""
  del net, config
  return {name: metrics.frechet_distance(*summary.spatial.statistics(), ref.mu_s, ref.sigma_s)}


def inception_score(summary, ref, net, config, name) -> dict[str, float]:
  """IS (Salimans et al. 2016), mean and standard deviation over config.is_splits splits."""
  del ref, net
  score, std = metrics.inception_score(summary.logits, config.is_splits)
  return {name: score, f"{name}_std": std}


def precision_recall(summary, ref, net, config, name) -> dict[str, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019), k = config.pr_k."""
  del name
  precision, recall = metrics.precision_recall(
    _reference_pool_features(ref, net), summary.pool_features, config.pr_k
  )
  return {"precision": precision, "recall": recall}


def _reference_pool_features(ref: reference.ReferenceStats, net) -> np.ndarray:
  """The reference's pool features [N, D]; computed from its images (an ADM reference batch)."""
  if ref.features is not None:
    return ref.features
  batches = features.local_batches(ref.images, net.global_batch_size(len(ref.images)))
  return features.summarize(
    net, batches, keep_pool=True, total=len(ref.images), desc="reference images"
  ).pool_features


METRICS: dict[str, Metric] = {
  "fid": Metric(keeps_logits=False, keeps_pool=False, compute=frechet_distance),
  "is": Metric(keeps_logits=True, keeps_pool=False, compute=inception_score),
  "sfid": Metric(
    keeps_logits=False, keeps_pool=False, compute=spatial_frechet_distance, uses_spatial=True
  ),
  "precision_recall": Metric(keeps_logits=False, keeps_pool=True, compute=precision_recall),
  "fd_digits": Metric(keeps_logits=False, keeps_pool=False, compute=frechet_distance),
  "is_digits": Metric(keeps_logits=True, keeps_pool=False, compute=inception_score),
}


def network(name: str) -> str:
  """The feature network sample metric `name` runs on."""
  return METRIC_NETWORKS[name]
