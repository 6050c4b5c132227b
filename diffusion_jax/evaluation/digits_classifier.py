"""A small classifier of the 8x8 digits: the feature network of the offline evaluation.

Inception features mean nothing on 8x8 grayscale digits, so the digits
evaluation measures its Fréchet distance (`fd_digits`) and "classifier score"
(`is_digits`, the Inception Score's formula on this classifier's logits) on
the features of a CNN trained here, offline, in seconds, on the digits' train
split, and cached. These numbers compare runs on the digits with each other
and with held-out real digits; they are not FID or IS and are never named so.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import serialization
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from diffusion_jax import files, parallel

FEATURE_DIM = 64
NUM_CLASSES = 10
# The cache is keyed on this file's code: a change to the network or its training
# retrains it rather than serving weights trained by older code.
_CODE_VERSION = hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:12]
_TRAIN_STEPS = 300
_BATCH_SIZE = 128


class DigitsClassifier(nn.Module):
  """Conv(32) -> Conv(64, stride 2) -> Dense(64) features -> Dense(10) logits, on [N, 8, 8, 1]."""

  @nn.compact
  def __call__(self, images_uint8: jax.Array) -> dict[str, jax.Array]:
    x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))  # [N, 4, 4, 64]
    features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
    return {"pool": features, "logits": nn.Dense(NUM_CLASSES)(features)}


def init_params(seed: int = 0):
  """Untrained parameters: what `load_or_train` reads into, or a placeholder to receive them."""
  return DigitsClassifier().init(jax.random.key(seed), np.zeros((1, 8, 8, 1), np.uint8))["params"]


def train(images_uint8: np.ndarray, labels: np.ndarray, seed: int = 0):
  """Trains the classifier with Adam on uint8 [N, 8, 8, 1] digits and their labels; -> params."""
  model = DigitsClassifier()
  images_uint8, labels = jnp.asarray(images_uint8), jnp.asarray(labels, jnp.int32)
  params = init_params(seed)
  tx = optax.adam(2e-3)

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, key):
    params, opt_state = carry
    rows = jax.random.randint(key, (_BATCH_SIZE,), 0, len(images_uint8))
    grads = jax.grad(loss_fn)(params, images_uint8[rows], labels[rows])
    updates, opt_state = tx.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), None

  keys = jax.random.split(jax.random.key(seed + 1), _TRAIN_STEPS)
  scan = jax.jit(lambda params: jax.lax.scan(step, (params, tx.init(params)), keys)[0][0])
  return scan(params)


def load_or_train(cache_dir: str | None = None, seed: int = 0):
  """The classifier's params: read from the cache, or trained on the digits' train split and cached.

  The cache file is written atomically; a damaged one is retrained over.
  """
  from diffusion_jax.data import sources  # pylint: disable=g-import-not-at-top  (imports TF)

  path = files.join(
    cache_dir or files.default_cache_dir(), f"digits_classifier-{_CODE_VERSION}-seed{seed}.msgpack"
  )
  if files.exists(path):
    try:
      return serialization.from_bytes(init_params(), files.read_bytes(path))
    except (ValueError, KeyError) as error:
      logging.warning("Retraining the digits classifier: cannot read %s (%s).", path, error)
  logging.info("Training the digits classifier (%d steps) into %s.", _TRAIN_STEPS, path)
  train_set = sources.digits_source("train")
  params = train(train_set.images, train_set.labels, seed)
  files.write_bytes(path, serialization.to_bytes(params))
  return params


def classify(params, images_uint8):
  """Pure: uint8 [N, 8, 8, 1] -> {"pool": float32 [N, 64], "logits": float32 [N, 10]}."""
  return DigitsClassifier().apply({"params": params}, images_uint8)


_apply = jax.jit(classify)


def sharded_features_fn(params, mesh) -> Callable[[jax.Array], dict]:
  """`features(uint8 [B, 8, 8, 1]) -> {"pool", "logits"}` on batches sharded over `mesh`.

  As `inception.sharded_features_fn`: the batch may span the devices of
  several processes; `params` are the same on every process.
  """
  batch = parallel.batch_sharding(mesh)
  sharded = jax.jit(classify, in_shardings=(parallel.replicated(mesh), batch), out_shardings=batch)
  return functools.partial(
    sharded, multihost_utils.host_local_array_to_global_array(params, mesh, P())
  )


def digits_features(
  params, images_uint8: np.ndarray, batch_size: int = 1024
) -> dict[str, np.ndarray]:
  """{"pool": float32 [N, 64], "logits": float32 [N, 10]} of uint8 [N, 8, 8, 1] digits."""
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.dtype != np.uint8 or images_uint8.shape[1:] != (8, 8, 1):
    raise ValueError(
      "The digits classifier takes uint8 [N, 8, 8, 1] images, got "
      f"{images_uint8.dtype} {images_uint8.shape}."
    )
  outputs = [
    jax.device_get(_apply(params, images_uint8[i : i + batch_size]))
    for i in range(0, len(images_uint8), batch_size)
  ]
  return {k: np.concatenate([o[k] for o in outputs]) for k in ("pool", "logits")}
