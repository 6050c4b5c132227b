"""Checksums of the arrays of a pytree, computed on their devices: what a checkpoint verifies.

Sharding-independent and cheap: each device reduces its own shards to one
uint32 per array, and only those scalars come to the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32: one word per element of 1, 2 or 4 bytes, two per 8 bytes."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize < 4:
    unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """uint32 []: the sum of word_i * (2i + 1) mod 2^32 over the words of `x`, i in row-major order.

  A change of any one word changes it (odd factors are invertible mod 2^32).
  Integer sums are exact, so it is the same on any sharding, mesh or number
  of hosts, and each device reads only its own shard.
  """
  words = _words(x)
  index, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):
    index += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % 2**32)
    stride *= words.shape[axis]
  return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


def _is_finite(x: jax.Array) -> jax.Array:
  """bool []: whether every value of `x` is finite (always, for integer arrays)."""
  return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)


_summarize = jax.jit(lambda tree: (jax.tree.map(_checksum, tree), jax.tree.map(_is_finite, tree)))


def array_summaries(tree) -> tuple[dict[str, int], list[str]]:
  """({array name: checksum}, [names of arrays with non-finite values]) of a pytree of arrays.

  Names are the arrays' paths, e.g. "ema_params/Conv_0/kernel"; computed on
  the devices, one scalar per array comes to the host.
  """
  checksums, finite = jax.device_get(_summarize(tree))
  names = [
    jax.tree_util.keystr(path, simple=True, separator="/")
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]
  return (
    {name: int(c) for name, c in zip(names, jax.tree.leaves(checksums))},
    [name for name, ok in zip(names, jax.tree.leaves(finite)) if not ok],
  )
