"""The one path layer: every file under a user's path is read and written here.

Workdirs, output folders, data folders, reference statistics, samples and
weight files may be local paths, `gs://bucket/...` or the other schemes that
`etils.epath` (what Orbax itself uses) serves through fsspec (s3://, az://,
hf://; not memory://); epath makes them behave alike. A path is kept as the user gave it: `gs://b/run` stays `gs://b/run`,
and a relative local path is never resolved against the working directory in
what the project records.

Writes are atomic, a finished file or none, never half of one: on a local disk
through a temporary file beside the target that is flushed and renamed onto
it; on an object store by uploading the finished bytes in one request (a GCS
object upload is atomic), with no rename dance.

gs:// goes through fsspec's gcsfs, which honours the usual Google credentials
(and `STORAGE_EMULATOR_HOST`), not through TensorFlow's GCS client: importing
this module sets `EPATH_USE_TF=false` unless the environment says otherwise
(see docs/training.md, "Running on GCS"). epath reads that variable when it
first opens a gs:// path, so Orbax's checkpoints and TFDS follow it too.

A read, write or listing that fails raises `PathError` (a `FileNotFoundError`
or `PermissionError` where that is what happened), one line naming the path:
a missing bucket or denied access reads "gs://b/run/config.json: ..." rather
than an HTTP URL.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

# Before epath first meets a gs:// path: gcsfs, not TensorFlow's GCS client (see above).
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402  (after EPATH_USE_TF)

PathLike = str | os.PathLike
_NPY_MAGIC = b"\x93NUMPY"  # how a .npy file starts
_DEFLATE_MAX_RATIO = 1032  # deflate codes a 258-byte match in 2 bits at best


class PathError(OSError):
  """A file or folder under a user's path cannot be read, written or listed; names the path."""


class PathNotFoundError(PathError, FileNotFoundError):
  """The path, or the bucket holding it, does not exist."""


class PathDeniedError(PathError, PermissionError):
  """The credentials in use may not read or write the path."""


@contextlib.contextmanager
def naming_failures(p: PathLike) -> Iterator[None]:
  """Re-raises an OSError of the filesystem or object store as one line naming `p`.

  gcsfs reports a missing bucket as FileNotFoundError("b/BUCKET/o") and a
  denied request as OSError("Forbidden: URL ..."): neither names the path the
  user gave.
  """
  try:
    yield
  except PathError:
    raise
  except FileNotFoundError as e:
    where = "" if is_local(p) else f" (or no bucket {_bucket(p)!r})"
    raise PathNotFoundError(f"{os.fspath(p)}: no such file or directory{where}") from e
  except OSError as e:
    reason = e.strerror or _first_line(e)
    if is_local(p):
      error = PathDeniedError if isinstance(e, PermissionError) else PathError
      raise error(f"{os.fspath(p)}: {reason}") from e
    if reason.startswith("Forbidden"):
      raise PathDeniedError(
        f"{os.fspath(p)}: access denied to the credentials in use ({reason})"
      ) from e
    raise PathError(f"{os.fspath(p)}: {reason}") from e


def _bucket(p: PathLike) -> str:
  """The bucket (host part) of a `scheme://bucket/...` path."""
  return os.fspath(p).split("://", 1)[1].split("/", 1)[0]


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def path(p: PathLike) -> epath.Path:
  """`p` as an `epath.Path` (local, gs://, s3://, ...), not resolved against the working directory."""
  return epath.Path(p)


def is_local(p: PathLike) -> bool:
  """Whether `p` names a file on this machine's filesystem (no `scheme://` prefix)."""
  return "://" not in os.fspath(p)


def join(p: PathLike, *parts: str) -> str:
  """`p / parts` as a string, the way the user would write it (`gs://b/run/x`, `run/x`)."""
  return os.fspath(path(p).joinpath(*parts)) if parts else os.fspath(path(p))


def absolute(p: PathLike) -> epath.Path:
  """`p` resolved against the working directory if local, as given if remote.

  Only for libraries that insist on absolute paths (Orbax); what the project
  records or prints keeps the path as the user gave it.
  """
  return path(os.path.abspath(p) if is_local(p) else p)


def exists(p: PathLike) -> bool:
  """Whether `p` exists; denied access raises (gcsfs answers it), never reads as "missing"."""
  with naming_failures(p):
    return path(p).exists()


def is_file(p: PathLike) -> bool:
  with naming_failures(p):
    return path(p).is_file()


def is_dir(p: PathLike) -> bool:
  with naming_failures(p):
    return path(p).is_dir()


def makedirs(p: PathLike) -> None:
  """Creates directory `p` and its parents; nothing on object stores, whose folders are implicit.

  (gcsfs's makedirs would create a missing bucket: a typo must fail, not make one.)
  """
  if is_local(p):
    with naming_failures(p):
      os.makedirs(p, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  """The names in directory `p`, sorted."""
  with naming_failures(p):
    return sorted(child.name for child in path(p).iterdir())


def find_files(root: PathLike, suffixes: tuple[str, ...]) -> list[str]:
  """The files under `root`, recursively, whose suffix (lower-cased) is in `suffixes`.

  Paths relative to `root` with "/" separators, sorted, so that the order does
  not depend on the filesystem's listing order. One listing per folder (also
  on object stores, where epath's rglob is refused).
  """
  found, top = [], None
  with naming_failures(root):
    for directory, _, names in path(root).walk():  # top-down: the root comes first
      top = top or directory  # fsspec's walk drops the "gs://": relate to its own spelling
      relative = directory.relative_to(top)
      found.extend(
        (relative / name).as_posix()
        for name in names
        if os.path.splitext(name)[1].lower() in suffixes
      )
  return sorted(found)


@contextlib.contextmanager
def open_for_read(p: PathLike) -> Iterator[io.BufferedIOBase]:
  """`p` opened for binary reading, streamed (seekable): for Pillow, zip archives, large files."""
  with naming_failures(p):
    f = path(p).open("rb")
  with f:
    yield f


def size(p: PathLike) -> int:
  """The size of file `p` in bytes."""
  with naming_failures(p):
    return path(p).stat().length


def remove(p: PathLike) -> None:
  """Deletes file `p`, if it exists."""
  with naming_failures(p):
    path(p).unlink(missing_ok=True)


def read_bytes(p: PathLike) -> bytes:
  with naming_failures(p):
    return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return read_bytes(p).decode()


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


@contextlib.contextmanager
def atomic_path(p: PathLike) -> Iterator[str]:
  """Yields a local temporary path; what is written there becomes `p` when the block ends.

  On a local disk the temporary file lies beside `p`, keeps its suffix
  (np.savez appends ".npz" otherwise), is flushed to disk and renamed onto `p`;
  on an object store its bytes are uploaded to `p` in one request. If the block
  raises, nothing is written and any earlier file at `p` stays as it was.
  """
  name = path(p).name
  suffix = os.path.splitext(name)[1]
  if is_local(p):
    directory = os.path.dirname(os.fspath(p)) or os.curdir
    makedirs(directory)
    with _temporary_file(directory, name, suffix) as temporary:
      yield temporary
      with naming_failures(p):
        with open(temporary, "rb+") as f:
          os.fsync(f.fileno())
        os.replace(temporary, p)
  else:
    with tempfile.TemporaryDirectory() as directory:
      with _temporary_file(directory, name, suffix) as temporary:
        yield temporary
        with open(temporary, "rb") as f, naming_failures(p):
          path(p).write_bytes(f.read())


@contextlib.contextmanager
def _temporary_file(directory: str, name: str, suffix: str) -> Iterator[str]:
  """An empty file `directory/.name.XXXX<suffix>`, readable as a normal new file, removed after."""
  with naming_failures(directory):
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=directory)
  os.close(descriptor)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would make every written file private
  try:
    yield temporary
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes `data` to `p`, atomically."""
  with atomic_path(p) as temporary, open(temporary, "wb") as f:
    f.write(data)


def write_text(p: PathLike, text: str) -> None:
  """Writes `text` to `p`, atomically."""
  write_bytes(p, text.encode())


def write_json(p: PathLike, value: Any, **dumps_kwargs) -> None:
  """Writes `json.dumps(value)` to `p`, atomically."""
  write_text(p, json.dumps(value, **dumps_kwargs))


def append_line(p: PathLike, line: str) -> None:
  """Appends `line` and a newline to the text file `p` (created if missing).

  Object stores cannot append: the file is read and rewritten whole, atomically,
  so this suits small logs written by one process (config_history.jsonl).
  """
  old = read_text(p) if exists(p) else ""
  write_text(p, old + line + "\n")


def save_npz(p: PathLike, **arrays: np.ndarray) -> None:
  """np.savez(p, **arrays), atomically."""
  with atomic_path(p) as temporary:
    np.savez(temporary, **arrays)


def load_npz(p: PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """The arrays of the .npz file `p`: those of `names` that it holds, or all of them.

  A file from elsewhere may be damaged or hostile: pickled objects are
  refused, and before anything is allocated each array's zip record is
  bounded by what its stored bytes can inflate to (at most 1032 times, all
  records together within the file) and its .npy header is checked against
  the record's size, so a truncated file, a .npy under an .npz name, a header
  claiming 10^13 elements or a few bytes stating gigabytes is one ValueError
  naming the file.

  Raises:
    FileNotFoundError: no file at `p`.
    ValueError: naming `p` (and the array) and what is wrong with it.
  """
  if not is_file(p):
    raise FileNotFoundError(f"No file at {os.fspath(p)!r}.")
  data = read_bytes(p)
  if data.startswith(_NPY_MAGIC):
    raise ValueError(f"{os.fspath(p)} holds a single array (.npy), not an .npz archive.")
  try:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
      wanted = members if names is None else [name for name in names if name in members]
      _check_stated_sizes([members[name] for name in wanted], len(data))
      return {name: _read_npz_member(archive, members[name]) for name in wanted}
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
    raise ValueError(f"{os.fspath(p)} is not an .npz file: {error}") from error


def _check_stated_sizes(infos: list[zipfile.ZipInfo], file_size: int) -> None:
  """Refuses records whose stated sizes exceed what `file_size` bytes can hold or inflate to."""
  if sum(info.compress_size for info in infos) > file_size:
    raise ValueError(
      f"its records state {sum(info.compress_size for info in infos):,} stored"
      f" bytes in a file of {file_size:,}"
    )
  for info in infos:
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
      raise ValueError(
        f"array {info.filename!r} is compressed with zip method"
        f" {info.compress_type}; np.savez stores or deflates"
      )
    most = info.compress_size * (
      1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_MAX_RATIO
    )
    if info.file_size > most:
      raise ValueError(
        f"array {info.filename!r} states {info.file_size:,} bytes; its"
        f" {info.compress_size:,} stored bytes hold at most {most:,}"
      )


def _read_npz_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
  """One array of an .npz archive, its header checked against its stored size first."""
  with archive.open(info) as f:
    version = np.lib.format.read_magic(f)
    read_header = (
      np.lib.format.read_array_header_1_0
      if version == (1, 0)
      else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read_header(f)
    claimed, stored = math.prod(shape) * dtype.itemsize, info.file_size - f.tell()
  if dtype.hasobject:
    raise ValueError(f"array {info.filename!r} holds Python objects (a pickle), not numbers")
  if claimed != stored:
    raise ValueError(
      f"array {info.filename!r} claims shape {shape} of {dtype} ({claimed:,} bytes)"
      f" but {stored:,} bytes are stored"
    )
  with archive.open(info) as f:
    return np.lib.format.read_array(f, allow_pickle=False)


def default_cache_dir() -> str:
  """$DIFFUSION_JAX_CACHE, else ~/.cache/diffusion_jax: cached models and compiled programs."""
  return os.environ.get(
    "DIFFUSION_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax")
  )
