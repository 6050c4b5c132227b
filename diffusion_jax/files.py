"""Atomic file writes (a finished file or none, never half of one), checked .npz reads, the cache."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator

import numpy as np

_NPY_MAGIC = b"\x93NUMPY"  # how a .npy file starts


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


def read_npz(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """The arrays of an .npz file: those of `names` that it holds, or all of them.

  A file from elsewhere may be damaged or hostile: pickled objects are
  refused, and each array's header is checked against the bytes stored
  before anything is allocated, so a truncated file, a .npy under an .npz
  name or a header claiming 10^13 elements is one ValueError naming the file.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: naming `path` (and the array) and what is wrong with it.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No file at {os.fspath(path)!r}.")
  with open(path, "rb") as f:
    if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
      raise ValueError(f"{os.fspath(path)} holds a single array (.npy), not an .npz archive.")
  try:
    with zipfile.ZipFile(path) as archive:
      members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
      wanted = members if names is None else [name for name in names if name in members]
      return {name: _read_npz_member(archive, members[name]) for name in wanted}
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
    raise ValueError(f"{os.fspath(path)} is not an .npz file: {error}") from error


def _read_npz_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
  """One array of an .npz archive, its header checked against its stored size first."""
  with archive.open(info) as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(f)
    claimed, stored = math.prod(shape) * dtype.itemsize, info.file_size - f.tell()
  if dtype.hasobject:
    raise ValueError(f"array {info.filename!r} holds Python objects (a pickle), not numbers")
  if claimed != stored:
    raise ValueError(f"array {info.filename!r} claims shape {shape} of {dtype} ({claimed:,} bytes)"
                     f" but {stored:,} bytes are stored")
  with archive.open(info) as f:
    return np.lib.format.read_array(f, allow_pickle=False)
