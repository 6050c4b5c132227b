"""What the processes of a multi-process evaluation exchange: statistics, rows, decisions.

Every function here is a collective: all processes call it together, in the
same order, and all get the same result.
"""

from __future__ import annotations

import functools

import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax.evaluation import metrics


def merge_over_processes(accumulator: metrics.GaussianAccumulator) -> metrics.GaussianAccumulator:
  """The accumulators of every process merged in process order: the same on every process.

  Counts, means and scatter matrices travel bit for bit (float64 as pairs of
  32-bit words: JAX's collectives would round float64 to float32).
  """
  counts = _allgather_exact(np.array([accumulator.count], np.int64))[:, 0]
  means = _allgather_exact(accumulator.mean)
  scatters = _allgather_exact(accumulator.scatter)
  parts = [
    metrics.GaussianAccumulator.from_moments(int(count), mean, scatter)
    for count, mean, scatter in zip(counts, means, scatters)
  ]
  return functools.reduce(metrics.GaussianAccumulator.merge, parts)


def _allgather_exact(array: np.ndarray) -> np.ndarray:
  """[process count, *array.shape]: every process's 64-bit `array`, bit for bit."""
  array = np.ascontiguousarray(array)
  words = array.reshape(-1).view(np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(words))  # [P, 2 * array.size]
  return gathered.view(array.dtype).reshape(-1, *array.shape)


def gather_in_order(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
  """Every process's `rows` [n, ...] as one array ordered by `index` [n]; index -1 dropped."""
  rows, index = multihost_utils.process_allgather((rows, index), tiled=True)
  keep = index >= 0
  return np.asarray(rows)[keep][np.argsort(index[keep], kind="stable")]


def process_0_says(flag: bool) -> bool:
  """Process 0's `flag`, on every process: a decision all of them act on alike.

  E.g. whether a file is already finished: were each process to look for
  itself, one that does not see it yet would wait in a collective alone.
  """
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))
