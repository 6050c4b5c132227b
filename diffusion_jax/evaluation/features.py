"""Feature networks of the sample metrics, and the statistics of an image set's features.

Two networks: the FID Inception-v3 (`fid`, `is`, `sfid`, `precision_recall`)
and the small digits classifier of the offline evaluation (`fd_digits`,
`is_digits`). Each maps uint8 images [B, H, W, C] to {"pool" [B, D],
"logits" [B, K]} (and "spatial" for Inception); `summarize` streams any
number of images through one and keeps what the metrics need.

Every process of a multi-process job calls `summarize` together, each with
its share of the images (`local_batches`, or `data.make_eval_iterator` for a
data split): each batch is one array over the devices of all processes, every
process accumulates the Gaussian statistics of its own rows in float64, and
at the end the processes exchange those statistics bit for bit and merge them
in process order, so every process holds the same result, equal to one
process's within float64 round-off. Logits and pool features, which the
Inception Score and precision/recall need one by one, are gathered and put
back in the image set's order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from diffusion_jax import files, parallel, perf, weightfiles
from diffusion_jax.config.evaluation import EvalConfig
from diffusion_jax.evaluation import digits_classifier, hosts, inception, metrics


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """A feature network over the devices of every process.

  `features` maps a uint8 [B, H, W, C] `jax.Array` sharded over `mesh`'s
  "data" axis to {"pool", "logits"[, "spatial"]} sharded the same way;
  `flops` gives its FLOPs per device on such a batch (a `jax.ShapeDtypeStruct`
  of the global batch), XLA's count of the lowered programs, for the logged
  throughput and MFU.
  """

  name: str  # "inception" or "digits_classifier"
  features: Callable[[jax.Array], dict[str, jax.Array]]
  mesh: Mesh  # all devices of all processes
  batch_size: int  # images per global batch: config.feature_batch_size rounded up to the devices
  pool_dim: int
  spatial_dim: int | None  # None: no spatial features (no sFID)
  info: dict  # what the report records: weights file, SHA-256, resize mode, ...
  flops: Callable[[jax.ShapeDtypeStruct], float]

  def global_batch_size(self, num_images: int) -> int:
    """Images per batch for a set of `num_images`: a small set is not padded to a full batch."""
    return min(self.batch_size, _round_up(num_images, self.mesh.size))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


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
      " --config.inception_sha256_prefix='' to evaluate with these weights anyway."
    )
  mesh = parallel.make_mesh()
  variables = inception.load_inception(path)
  features = inception.sharded_features_fn(variables, config.resize, mesh)
  spatial_dim = 17 * 17 * inception.SPATIAL_CHANNELS
  return FeatureNet(
    "inception",
    features,
    mesh,
    _batch_size(config, mesh),
    inception.POOL_FEATURES,
    spatial_dim,
    {
      "weights": path,
      "sha256": digest,
      "resize": config.resize,
      "published_weights": digest.startswith(inception.WEIGHTS_SHA256_PREFIX),
    },
    _flops_per_device(
      functools.partial(inception.apply_inception, resize=config.resize), variables, mesh
    ),
  )


def load_digits_net(config: EvalConfig) -> FeatureNet:
  """The digits classifier, trained on the digits' train split on first use and cached.

  Process 0 reads (or trains) it and sends it to the others: every process
  computes features with the same weights, even where training is not
  bit-reproducible.
  """
  params = (
    digits_classifier.load_or_train()
    if jax.process_index() == 0
    else digits_classifier.init_params()
  )
  mesh = parallel.make_mesh()
  params = multihost_utils.broadcast_one_to_all(params)
  features = digits_classifier.sharded_features_fn(params, mesh)
  return FeatureNet(
    "digits_classifier",
    features,
    mesh,
    _batch_size(config, mesh),
    digits_classifier.FEATURE_DIM,
    None,
    {
      "network": "digits_classifier",
      "trained_on": "digits train split",
      "cache": files.default_cache_dir(),
    },
    _flops_per_device(digits_classifier.classify, params, mesh),
  )


def _batch_size(config: EvalConfig, mesh: Mesh) -> int:
  return _round_up(config.feature_batch_size, mesh.size)


def _flops_per_device(apply: Callable[..., dict], variables, mesh: Mesh) -> Callable:
  """FeatureNet.flops of `apply(variables, uint8 images) -> features`: lowered once per shape.

  The variables are an argument of the lowered program, not constants in it.
  """
  return functools.cache(
    lambda images: perf.lowered_flops(jax.jit(apply).lower(variables, images), mesh.size)
  )


LOADERS = {"inception": load_inception_net, "digits_classifier": load_digits_net}


@dataclasses.dataclass
class FeatureSummary:
  """What the metrics need of an image set's features, the same on every process."""

  pool: metrics.GaussianAccumulator
  spatial: metrics.GaussianAccumulator | None
  logits: np.ndarray | None  # [N, K] in the set's order, for the Inception Score's splits
  pool_features: np.ndarray | None  # [N, D] in the set's order, for precision/recall

  @property
  def count(self) -> int:
    return self.pool.count


def summarize(
  net: FeatureNet,
  batches: Iterable[dict[str, np.ndarray]],
  *,
  keep_logits: bool = False,
  keep_pool: bool = False,
  total: int | None = None,
  desc: str = "features",
) -> FeatureSummary:
  """Streams this process's batches through `net`; call it on every process together.

  Args:
    net: the feature network.
    batches: this process's `{"image": uint8 [B, H, W, C], "mask": bool [B],
      "index": int [B]}` batches (`local_batches`, or a data split's eval
      iterator in uint8), the same number on every process, B x process count
      = a multiple of the devices. `index` is each image's position in the
      whole set (-1 and mask False: padding).
    keep_logits, keep_pool: also gather the logits / pool features of every
      image, in the set's order (on every process: N x K numbers each).
    total: the number of images, for the progress bar of process 0.
  """
  pool = metrics.GaussianAccumulator(net.pool_dim)
  spatial = metrics.GaussianAccumulator(net.spatial_dim) if net.spatial_dim else None
  logits, pool_rows, index = [], [], []  # this process's rows, padding included
  started, timed = None, 0  # the batches after the first, whose time holds the compile
  with tqdm.tqdm(total=total, desc=desc, unit="img", disable=jax.process_index() > 0) as bar:
    for batch, features in _local_features(net, batches):
      if started is None:
        started = time.perf_counter()
      else:
        timed += 1
      mask = batch["mask"]
      pool.update(features["pool"][mask])
      if spatial is not None:
        spatial.update(features["spatial"][mask])
      if keep_logits:
        logits.append(features["logits"])
      if keep_pool:
        pool_rows.append(features["pool"])
      index.append(np.where(mask, batch["index"], -1))
      bar.update(int(mask.sum()) * jax.process_count())
  if timed:
    _log_throughput(net, desc, batch["image"].shape, timed, time.perf_counter() - started)
  index = np.concatenate(index)
  in_order = lambda rows: hosts.gather_in_order(np.concatenate(rows), index)
  return FeatureSummary(
    pool=hosts.merge_over_processes(pool),
    spatial=None if spatial is None else hosts.merge_over_processes(spatial),
    logits=in_order(logits) if keep_logits else None,
    pool_features=in_order(pool_rows) if keep_pool else None,
  )


def _log_throughput(
  net: FeatureNet, desc: str, local_shape: tuple[int, ...], batches: int, seconds: float
) -> None:
  """Logs images/s, TFLOP/s per device and MFU of `batches` batches of this process's `local_shape`."""
  shape = (local_shape[0] * jax.process_count(), *local_shape[1:])
  rates = perf.rates(
    batches,
    seconds,
    net.flops(jax.ShapeDtypeStruct(shape, jnp.uint8)),
    shape[0],
    perf.peak_flops(jax.devices()[0].device_kind, jnp.float32),
  )
  logging.info("%s: %s (the %d batches after the first).", desc, perf.format_rates(rates), batches)


def _local_features(net: FeatureNet, batches: Iterable[dict[str, np.ndarray]]) -> Iterator:
  """(batch, this process's rows of its features as NumPy arrays), for each batch.

  Each batch is dispatched before the previous one's features are fetched, so
  the host's copy overlaps the devices' work.
  """
  spec = P(parallel.DATA_AXIS)
  pending = None
  for batch in batches:
    images = multihost_utils.host_local_array_to_global_array(batch["image"], net.mesh, spec)
    features = net.features(images)
    if pending is not None:
      yield pending[0], jax.device_get(pending[1])
    pending = batch, multihost_utils.global_array_to_host_local_array(features, net.mesh, spec)
  if pending is not None:
    yield pending[0], jax.device_get(pending[1])


def local_batches(images: np.ndarray, global_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of `images` [N, H, W, C] (held by every process), as `summarize` takes it.

  Process p takes the p-th of `process_count` contiguous slices, in batches
  of global_batch_size / process_count padded with zero images (mask False,
  index -1); every process yields ceil(ceil(N / count) / batch) batches.
  """
  count = jax.process_count()
  local = global_batch_size // count
  rows = np.array_split(np.arange(len(images)), count)[jax.process_index()]
  for b in range(math.ceil(math.ceil(len(images) / count) / local)):
    index = np.full(local, -1)
    chunk = rows[b * local : (b + 1) * local]
    index[: len(chunk)] = chunk
    batch = np.zeros((local, *images.shape[1:]), np.uint8)
    batch[: len(chunk)] = images[chunk]
    yield {"image": batch, "mask": index >= 0, "index": index}
