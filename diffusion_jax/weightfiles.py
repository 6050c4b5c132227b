"""Foreign weight files read as numpy arrays, without torch and without running code.

Weight files from the internet are untrusted input, and `torch.load` of a
pickle can run any code the pickle names. This module reads three formats
into `{name: np.ndarray}`:

- safetensors (diffusers): through `safetensors.numpy`;
- torch's zip format (`torch.save` since torch 1.6): `<prefix>/data.pkl`
  plus one raw record `<prefix>/data/<key>` per storage;
- torch's legacy format (`_use_new_zipfile_serialization=False`, and every
  file saved before torch 1.6): five pickles in a row (magic number,
  protocol version, writer's sys_info, the object, the storage keys), then
  each storage as an 8-byte little-endian element count and its bytes.

The pickles are read by an unpickler that admits only the globals a state
dict needs (`collections.OrderedDict`, torch's tensor and parameter rebuild
functions, the typed storage classes, all replaced by stand-ins written
here); any other global raises `UnsafeWeightFileError` naming it, before
anything is called. Tensors are rebuilt from the raw storage bytes with
their offset, shape and strides (in elements), bounds-checked, and copied
to C-contiguous arrays, so views of one storage (tied weights, transposes,
slices) come back as independent arrays. An nn.Parameter is read as its
tensor (its requires_grad flag and its OrderedDict of backward hooks are
plain data, dropped). One storage record at a time is held besides the
result, so loading a torch file peaks near the size of its tensors.

Returned values:
- bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays (numpy has no
  bfloat16; ml_dtypes ships with jax, and `jnp.asarray` takes them as is);
- the result is always flat: a pickled dict of tensors comes back as is; a
  wrapper such as `{"state_dict": {...}, "epoch": 3}` comes back with dotted
  names (`"state_dict.conv.weight"`); values that are neither tensors nor
  dicts (numbers, strings, lists) are dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import pickle
import zipfile
from collections.abc import Iterator

import ml_dtypes  # Importing it registers bfloat16 with numpy: safetensors.numpy reads BF16 then.
import numpy as np
import safetensors.numpy

from diffusion_jax import files

# Typed storage classes, as torch pickles them (`torch.FloatStorage`), and their element types.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save file
_LEGACY_PROTOCOL = 1001
_FORMATS = "safetensors, a torch zip file (torch.save) or a legacy torch file"


class WeightFileError(ValueError):
  """A weight file is damaged or not in a format this module reads."""


class UnsafeWeightFileError(WeightFileError):
  """A weight file's pickle names a global that is not needed for tensors (it would run code)."""


def sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
  """Hex SHA-256 digest of a file, read in chunks of `chunk_bytes`."""
  digest = hashlib.sha256()
  with files.open_for_read(path) as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a weight file into a flat `{name: array}`; the format is told from the content.

  Raises:
    UnsafeWeightFileError: the pickle names a global other than the admitted ones.
    WeightFileError: the file is damaged, or neither of the three formats.
  """
  path = os.fspath(path)
  with files.open_for_read(path) as f:
    head = f.read(9)
  size = files.size(path)
  if head.startswith(b"PK"):
    reader, kind = _load_torch_zip, "torch zip file"
  elif len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
    reader, kind = _load_safetensors, "safetensors file"
  elif head.startswith(b"\x80"):  # the PROTO opcode that starts a binary pickle
    reader, kind = _load_torch_legacy, "legacy torch file"
  else:
    raise WeightFileError(f"{path}: not a weight file: expected {_FORMATS};"
                          f" it starts with {head!r}.")
  try:
    return reader(path)
  except WeightFileError:
    raise
  except Exception as e:  # Damaged bytes break zipfile, pickle and numpy in many ways; name the file.
    raise WeightFileError(f"{path}: damaged {kind}: {type(e).__name__}: {e}") from e


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  if files.is_local(path):
    return dict(safetensors.numpy.load_file(path))
  return dict(safetensors.numpy.load(files.read_bytes(path)))


# Stand-ins for what the admitted globals build. Frozen with slots, so that a
# pickle's BUILD opcode cannot alter them after they were checked.


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
  """Stands for a torch typed storage class, e.g. torch.FloatStorage."""
  dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
  """The storage record `key`: `numel` elements of `dtype`."""
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Tensor:
  """A tensor to build once its storage is read: strides and offset in elements."""
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]
  negate: bool  # torch's neg bit: the storage holds minus the values


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _int_tuple(x, what: str) -> tuple[int, ...]:
  if not isinstance(x, (tuple, list)) or not all(_is_int(n) and n >= 0 for n in x):
    raise ValueError(f"tensor {what} {x!r} is not a tuple of non-negative ints")
  return tuple(x)


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles torch's data pickles; admits only the globals of a state dict.

  Admitted globals resolve to bound methods and frozen stand-ins, so the
  pickle can neither call anything else nor change what it is given.
  """

  def __init__(self, file, path: str):
    super().__init__(file, encoding="utf-8")  # utf-8: strings of files written by Python 2
    self.path = path
    self.storage_dtypes: dict[str, np.dtype] = {}  # record key -> element type
    self._allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
    }
    self._allowed.update({("torch", name): _StorageType(np.dtype(dtype))
                          for name, dtype in _STORAGE_DTYPES.items()})

  def find_class(self, module: str, name: str):
    if (module, name) in self._allowed:
      return self._allowed[module, name]
    raise UnsafeWeightFileError(
        f"{self.path}: refused to unpickle the global {module}.{name}: a weight file needs only"
        f" {', '.join(sorted(f'{m}.{n}' for m, n in self._allowed))}. torch.load(...,"
        " weights_only=False) would call it: convert the file in a sandbox, or get safetensors.")

  def persistent_load(self, pid) -> _Storage:
    """Zip: ('storage', type, key, location, numel); legacy adds view_metadata, always None."""
    if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str) or not _is_int(pid[4])):
      raise ValueError(f"persistent id {pid!r} is not a torch storage")
    if len(pid) == 6 and pid[5] is not None:  # written for views of storages, not of tensors
      raise WeightFileError(f"{self.path}: storage {pid[2]!r} is a view of another storage"
                            f" {pid[5]!r}; such legacy storage views are not supported.")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if self.storage_dtypes.setdefault(key, storage_type.dtype) != storage_type.dtype:
      raise ValueError(f"storage {key!r} is read both as {self.storage_dtypes[key]} and"
                       f" {storage_type.dtype}")
    return _Storage(key, storage_type.dtype, numel)

  def _rebuild_tensor(self, storage, storage_offset, size, stride) -> _Tensor:
    return self._rebuild_tensor_v2(storage, storage_offset, size, stride, False, None)

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad,
                         backward_hooks, metadata=None) -> _Tensor:
    """torch._utils._rebuild_tensor_v2; requires_grad and (data-only) backward_hooks are dropped."""
    del requires_grad, backward_hooks
    if not isinstance(storage, _Storage) or not _is_int(storage_offset) or storage_offset < 0:
      raise ValueError(f"tensor of storage {storage!r} at offset {storage_offset!r}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
      raise ValueError(f"tensor size {shape} and stride {strides} differ in length")
    if not isinstance(metadata, (dict, type(None))):
      raise ValueError(f"tensor metadata {metadata!r} is not a dict")
    flags = {k for k, v in (metadata or {}).items() if v}
    if flags - {"neg"}:  # conj needs complex storages, which are not admitted
      raise ValueError(f"tensor metadata {metadata!r} is not supported")
    return _Tensor(storage, storage_offset, shape, strides, negate="neg" in flags)

  def _rebuild_parameter(self, data, requires_grad, backward_hooks) -> _Tensor:
    """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
    del requires_grad, backward_hooks
    if not isinstance(data, _Tensor):
      raise ValueError(f"parameter of {type(data).__name__}, not of a tensor")
    return data


def _flat_tensors(obj, path: str) -> dict[str, _Tensor]:
  """The tensors of the unpickled object, nested dicts flattened with dotted names."""
  if not isinstance(obj, dict):
    kind = "single tensor" if isinstance(obj, _Tensor) else type(obj).__name__
    raise WeightFileError(f"{path}: holds a {kind}; expected a dict of tensors"
                          " (a state dict).")
  flat = {}

  def visit(tree: dict, prefix: str):
    for key, value in tree.items():
      name = f"{prefix}{key}"
      if isinstance(value, dict):
        visit(value, name + ".")
      elif isinstance(value, _Tensor):
        if name in flat:
          raise WeightFileError(f"{path}: the name {name!r} occurs twice once nested dicts are"
                                " flattened.")
        flat[name] = value

  visit(obj, "")
  return flat


def _tensor_array(storage: np.ndarray, tensor: _Tensor, path: str, name: str) -> np.ndarray:
  """The C-contiguous copy of `tensor`, a strided view of the 1-D record `storage`."""
  if storage.size != tensor.storage.numel:
    raise WeightFileError(f"{path}: storage {tensor.storage.key!r} of {name!r} holds"
                          f" {storage.size} elements, its pickle says {tensor.storage.numel}.")
  if 0 in tensor.shape:
    return np.zeros(tensor.shape, storage.dtype)
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides))
  if last >= storage.size:  # as_strided does not check: reading past would read foreign memory.
    raise WeightFileError(f"{path}: tensor {name!r} (offset {tensor.offset}, size"
                          f" {tensor.shape}, stride {tensor.strides}) reaches element {last} of"
                          f" a storage of {storage.size}.")
  strided = np.lib.stride_tricks.as_strided(
      storage[tensor.offset:], tensor.shape, [s * storage.itemsize for s in tensor.strides],
      writeable=False)
  array = np.array(strided, order="C")
  return np.negative(array, out=array) if tensor.negate else array


def _build_arrays(tensors: dict[str, _Tensor], storages: Iterator[tuple[str, np.ndarray]],
                  path: str) -> dict[str, np.ndarray]:
  """Arrays of `tensors`, in their order; `storages` yields each needed record once, in any order."""
  names_by_key = collections.defaultdict(list)
  for name, tensor in tensors.items():
    names_by_key[tensor.storage.key].append(name)
  arrays = {}
  for key, storage in storages:  # one record in memory at a time, besides the arrays built
    for name in names_by_key.pop(key, []):
      arrays[name] = _tensor_array(storage, tensors[name], path, name)
  if names_by_key:
    raise WeightFileError(f"{path}: no data for the storages {sorted(names_by_key)} of tensors"
                          f" {sorted(n for names in names_by_key.values() for n in names)}.")
  return {name: arrays[name] for name in tensors}


def _storage_from_bytes(data: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
  """A 1-D array of the raw storage bytes, swapped to native order when written big-endian."""
  if len(data) % dtype.itemsize:
    raise ValueError(f"{len(data)} bytes are not a whole number of {dtype} elements")
  if big_endian and dtype.itemsize > 1:
    data = np.frombuffer(data, np.uint8).reshape(-1, dtype.itemsize)[:, ::-1].tobytes()
  return np.frombuffer(data, dtype)


def _load_torch_zip(path: str) -> dict[str, np.ndarray]:
  with files.open_for_read(path) as f:
    is_zip = zipfile.is_zipfile(f)
  if not is_zip:
    raise WeightFileError(f"{path}: starts like a zip file (a torch.save file) but has no"
                          " zip directory: truncated or damaged.")
  with files.open_for_read(path) as f, zipfile.ZipFile(f) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise WeightFileError(f"{path}: a zip file but not a torch.save file: expected one"
                            f" <prefix>/data.pkl, found {pickles}.")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in archive.namelist():
      byteorder = archive.read(prefix + "byteorder").decode("ascii")
    if byteorder not in ("little", "big"):
      raise WeightFileError(f"{path}: unknown byteorder record {byteorder!r}.")
    with archive.open(pickles[0]) as f:
      unpickler = _RestrictedUnpickler(f, path)
      tensors = _flat_tensors(unpickler.load(), path)

    def storages():
      for key in dict.fromkeys(t.storage.key for t in tensors.values()):
        record, dtype = f"{prefix}data/{key}", unpickler.storage_dtypes[key]
        if record not in archive.NameToInfo:
          raise WeightFileError(f"{path}: no storage record {record!r}.")
        yield key, _storage_from_bytes(archive.read(record), dtype, byteorder == "big")

    return _build_arrays(tensors, storages(), path)


def _load_torch_legacy(path: str) -> dict[str, np.ndarray]:
  with files.open_for_read(path) as f:
    def next_pickle():
      return _RestrictedUnpickler(f, path).load()

    if next_pickle() != _LEGACY_MAGIC:
      raise WeightFileError(f"{path}: a pickle but not a torch.save file (no magic number);"
                            f" expected {_FORMATS}.")
    if (protocol := next_pickle()) != _LEGACY_PROTOCOL:
      raise WeightFileError(f"{path}: legacy torch protocol {protocol!r}, expected"
                            f" {_LEGACY_PROTOCOL}.")
    next_pickle()  # sys_info: the writer's byte order; storages are written little-endian anyway.
    unpickler = _RestrictedUnpickler(f, path)
    tensors = _flat_tensors(unpickler.load(), path)
    keys = next_pickle()
    if not isinstance(keys, list) or not all(k in unpickler.storage_dtypes for k in keys):
      raise WeightFileError(f"{path}: storage keys {keys!r} do not match the storages pickled.")
    needed = {t.storage.key for t in tensors.values()}
    file_size = os.fstat(f.fileno()).st_size

    def storages():
      for key in keys:
        dtype = unpickler.storage_dtypes[key]
        count = f.read(8)
        nbytes = int.from_bytes(count, "little") * dtype.itemsize
        if len(count) < 8 or nbytes > file_size - f.tell():
          raise WeightFileError(f"{path}: storage {key!r} needs {nbytes} bytes, the file ends"
                                f" after {file_size - f.tell()}: truncated.")
        if key in needed:
          yield key, _storage_from_bytes(f.read(nbytes), dtype, big_endian=False)
        else:
          f.seek(nbytes, os.SEEK_CUR)

    return _build_arrays(tensors, storages(), path)
