"""Atomic file writes (a finished file or none, never half of one) and the user's cache directory."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path beside `path`, moved onto `path` when the block ends without error.

  The temporary file keeps `path`'s suffix (np.savez appends ".npz" otherwise),
  is flushed to disk before the rename, and is removed if the block raises, so
  an interrupted write leaves any earlier file at `path` as it was.
  """
  directory, name = os.path.split(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1],
                                           dir=directory)
  os.close(descriptor)
  try:
    yield temporary
    with open(temporary, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """np.savez(path, **arrays), atomically."""
  with atomic_path(path) as temporary:
    np.savez(temporary, **arrays)


def default_cache_dir() -> str:
  """$DIFFUSION_JAX_CACHE, else ~/.cache/diffusion_jax: cached models and compiled programs."""
  return os.environ.get("DIFFUSION_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax"))
