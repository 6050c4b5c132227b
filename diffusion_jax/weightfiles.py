"""Foreign weight files read as numpy arrays: without torch, without running code, within bounds.

Weight files from the internet are untrusted input: `torch.load` of a pickle
can run any code the pickle names, and a reader that trusts a file's numbers
can be made to read foreign memory or to allocate without bound. This module
reads three formats into `{name: np.ndarray}`:

- safetensors (diffusers): through `safetensors.numpy`, which checks that the
  tensors tile the data region exactly; a header over 100 MB is refused first;
- torch's zip format (`torch.save` since torch 1.6): `<prefix>/data.pkl`
  plus one raw record `<prefix>/data/<key>` per storage;
- torch's legacy format (`_use_new_zipfile_serialization=False`, and every
  file saved before torch 1.6): five pickles in a row (magic number,
  protocol version, writer's sys_info, the object, the storage keys), then
  each storage as an 8-byte little-endian element count and its bytes.

What `load` guarantees for any file, however crafted:
- No code runs. Pickles are read by pickle's pure-Python unpickler with its
  opcode table cut to what a state dict needs (`_Unpickler`) and the globals
  cut to `collections.OrderedDict`, torch's tensor and parameter rebuild
  functions and the typed storage classes, all replaced by stand-ins written
  here. Any other global or opcode (INST, OBJ, NEWOBJ, extensions, sets,
  out-of-band buffers) raises `UnsafeWeightFileError` naming it, before
  anything is called. BUILD, SETITEM(S) and APPEND(S) act only on dicts and
  OrderedDicts (BUILD's state, torch's `_metadata`, is dropped) and lists;
  dict keys are None, bool, int, float, str or bytes. (The C unpickler would
  call `__setstate__` on whatever BUILD reaches, hash keys of any depth, and
  grow its memo to any index a 5-byte opcode names.)
- Arrays hold only the file's bytes. After unpickling, one function
  (`_checked_view`) turns each tensor record into a view: storage offset,
  size and strides non-negative int64 integers (at most 64 dims), no more
  elements than the storage holds, every element inside it; each storage
  record must hold exactly the bytes its pickle states. A tensor with
  overlapping elements (stride 0: `expand`) is copied like any view when it
  fits in its storage and refused otherwise: nothing is broadcast beyond it.
- Memory and time are bounded by the file's size. The arrays returned total
  at most the file's size in bytes, checked before any storage is read; zip
  records are sized from their headers (each storage exactly, data.pkl at
  most the file, byteorder at most 8 bytes) and never inflated further; each
  nested dict is walked once (a shared or recursive dict is refused), at
  most 100 deep, with names of at most 1000 characters.
- Errors are one line: `WeightFileError` (or `UnsafeWeightFileError`) naming
  the file, with every string read from it shown by `quote` (repr, at most
  200 characters).

Views of one storage (tied weights, transposes, slices) come back as
independent C-contiguous arrays. An nn.Parameter is read as its tensor (its
requires_grad flag and its OrderedDict of backward hooks are plain data,
dropped). One storage record at a time is held besides the result.

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
import io
import math
import os
import pickle
import reprlib
import zipfile
from collections.abc import Iterator
from typing import Any, BinaryIO

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

_QUOTE_CHARS = 200  # the longest a foreign string is shown in a message
_MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; safetensors' own cap
_MAX_BYTEORDER_BYTES = 8  # "little" or "big"
_MAX_DEPTH = 100  # nested dicts
_MAX_NAME_CHARS = 1000  # a flattened name
_MAX_DIMS = 64  # numpy's
_MAX_INDEX = 2**63 - 1  # offsets, sizes and strides are int64 in torch
_MAX_EMPTY_EXTENT = 2**40  # the product of an empty tensor's non-zero dims
_KEY_TYPES = (type(None), bool, int, float, str, bytes)  # hashed without recursion
_MAPPINGS = (dict, collections.OrderedDict)


class WeightFileError(ValueError):
  """A weight file is damaged, not in a format this module reads, or beyond its bounds."""


class UnsafeWeightFileError(WeightFileError):
  """A weight file's pickle asks for more than a state dict needs: a global, an opcode, a mutation."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, _QUOTE_CHARS, _QUOTE_CHARS, 60


def quote(value: Any) -> str:
  """`repr(value)` in at most 200 characters: how every message shows what a file holds.

  One line (repr escapes control characters), built without recursing deeper
  than 3 levels or formatting more than a few items of a container.
  """
  try:
    text = _REPR.repr(value)
  except Exception:  # pylint: disable=broad-except  (e.g. an int too long to format)
    text = f"<{type(value).__name__}>"
  return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


def sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
  """Hex SHA-256 digest of a file, read in chunks of `chunk_bytes`."""
  digest = hashlib.sha256()
  with files.open_for_read(path) as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a weight file into a flat `{name: array}`; the format is told from the content.

  The arrays total at most the file's size in bytes (see the module docstring).

  Raises:
    UnsafeWeightFileError: the pickle names a global or opcode a state dict does not need.
    WeightFileError: the file is damaged, beyond the bounds above, or in none of the formats.
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
    raise WeightFileError(
      f"{path}: not a weight file: expected {_FORMATS}; it starts with {head!r}."
    )
  try:
    return reader(path, size)
  except WeightFileError:
    raise
  except (
    Exception
  ) as e:  # Damaged bytes break zipfile, pickle and numpy in many ways; name the file.
    raise WeightFileError(f"{path}: damaged {kind}: {type(e).__name__}: {quote(str(e))}") from e


def _load_safetensors(path: str, size: int) -> dict[str, np.ndarray]:
  with files.open_for_read(path) as f:
    header_bytes = int.from_bytes(f.read(8), "little")
  if header_bytes > _MAX_SAFETENSORS_HEADER:
    raise WeightFileError(
      f"{path}: safetensors header of {header_bytes} bytes; at most"
      f" {_MAX_SAFETENSORS_HEADER} are read."
    )
  if files.is_local(path):
    return dict(safetensors.numpy.load_file(path))
  return dict(safetensors.numpy.load(files.read_bytes(path)))


# Stand-ins for what the admitted globals build. The unpickler lets no opcode
# act on them; the tensor records hold the pickle's arguments as given, and
# `_checked_view` checks them once the whole pickle is read.


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class _StorageType:
  """Stands for a torch typed storage class, e.g. torch.FloatStorage."""

  dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class _Storage:
  """The storage record `key`: `numel` elements of `dtype`."""

  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class _TensorRecord:
  """torch._utils._rebuild_tensor_v2's arguments, unchecked."""

  storage: Any
  offset: Any
  size: Any
  stride: Any
  metadata: Any


def _is_index(x) -> bool:
  return type(x) is int and 0 <= x <= _MAX_INDEX  # pylint: disable=unidiomatic-typecheck


class _Unpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Unpickles torch's data pickles: a state dict's opcodes and globals, nothing else.

  pickle's pure-Python unpickler with its opcode table cut (`_OPCODES`): the
  opcodes that mutate check what they act on, those a state dict never needs
  are refused, and the memo is a dict (no index allocates).
  """

  def __init__(self, file: BinaryIO, path: str):
    super().__init__(file, encoding="utf-8")  # utf-8: strings of files written by Python 2
    self.path = path
    self.storages: dict[str, _Storage] = {}  # record key -> the storage its persistent ids state
    self._allowed = {
      ("collections", "OrderedDict"): self._ordered_dict,
      ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
    }
    self._allowed.update(
      {("torch", name): _StorageType(np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()}
    )

  def find_class(self, module: str, name: str):
    if (module, name) in self._allowed:
      return self._allowed[module, name]
    raise UnsafeWeightFileError(
      f"{self.path}: refused to unpickle the global {quote(f'{module}.{name}')}: a weight file"
      f" needs only {', '.join(sorted(f'{m}.{n}' for m, n in self._allowed))}. torch.load(...,"
      " weights_only=False) would call it: convert the file in a sandbox, or get safetensors."
    )

  def persistent_load(self, pid) -> _Storage:
    """Zip: ('storage', type, key, location, numel); legacy adds view_metadata, always None."""
    if (
      type(pid) is not tuple
      or len(pid) not in (5, 6)
      or pid[0] != "storage"  # pylint: disable=unidiomatic-typecheck
      or not isinstance(pid[1], _StorageType)
      or type(pid[2]) is not str
      or not _is_index(pid[4])
    ):
      raise WeightFileError(
        f"{self.path}: persistent id {quote(pid)} is not a torch storage"
        " ('storage', type, key, location, element count)."
      )
    if len(pid) == 6 and pid[5] is not None:  # written for views of storages, not of tensors
      raise WeightFileError(
        f"{self.path}: storage {quote(pid[2])} is a view of another storage;"
        " such legacy storage views are not supported."
      )
    storage = _Storage(pid[2], pid[1].dtype, pid[4])
    if self.storages.setdefault(storage.key, storage) != storage:
      known = self.storages[storage.key]
      raise WeightFileError(
        f"{self.path}: storage {quote(storage.key)} is stated both as"
        f" {known.numel} {known.dtype} and {storage.numel} {storage.dtype}."
      )
    return storage

  # The admitted callables.

  def _ordered_dict(self, items=()) -> collections.OrderedDict:
    """collections.OrderedDict(); Python 2's pickles pass its [key, value] pairs."""
    if type(items) not in (list, tuple):  # pylint: disable=unidiomatic-typecheck
      raise WeightFileError(f"{self.path}: an OrderedDict of a {type(items).__name__}.")
    return collections.OrderedDict((self._key(key), value) for key, value in items)

  def _rebuild_tensor(self, storage, storage_offset, size, stride) -> _TensorRecord:
    return _TensorRecord(storage, storage_offset, size, stride, None)

  def _rebuild_tensor_v2(
    self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
  ) -> _TensorRecord:
    """torch._utils._rebuild_tensor_v2; requires_grad and (data-only) backward_hooks are dropped."""
    del requires_grad, backward_hooks
    return _TensorRecord(storage, storage_offset, size, stride, metadata)

  def _rebuild_parameter(self, data, requires_grad, backward_hooks) -> _TensorRecord:
    """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
    del requires_grad, backward_hooks
    if type(data) is not _TensorRecord:  # pylint: disable=unidiomatic-typecheck
      raise WeightFileError(
        f"{self.path}: a parameter of a {type(data).__name__}, not of a tensor."
      )
    return data

  # The opcodes that build or change containers, checking keys and what they act on.

  def _key(self, key):
    if type(key) not in _KEY_TYPES:
      raise WeightFileError(
        f"{self.path}: a dict key of type {type(key).__name__}; keys are"
        f" {', '.join(t.__name__ for t in _KEY_TYPES)}."
      )
    return key

  def _pairs(self, items: list) -> Iterator[tuple[Any, Any]]:
    for key, value in zip(items[::2], items[1::2]):
      yield self._key(key), value

  def _target(self, opcode: str, kinds: tuple[type, ...]):
    """The object on top of the stack that `opcode` acts on, when one of `kinds`."""
    target = self.stack[-1]
    if type(target) not in kinds:
      raise UnsafeWeightFileError(
        f"{self.path}: the pickle's {opcode} acts on a {type(target).__name__}; it may act only"
        f" on a {' or '.join(kind.__name__ for kind in kinds)}."
      )
    return target

  def load_dict(self):
    self.append(dict(self._pairs(self.pop_mark())))

  def load_setitem(self):
    value, key = self.stack.pop(), self.stack.pop()
    self._target("SETITEM", _MAPPINGS)[self._key(key)] = value

  def load_setitems(self):
    items = self.pop_mark()
    self._target("SETITEMS", _MAPPINGS).update(self._pairs(items))

  def load_append(self):
    value = self.stack.pop()
    self._target("APPEND", (list,)).append(value)

  def load_appends(self):
    items = self.pop_mark()
    self._target("APPENDS", (list,)).extend(items)

  def load_build(self):
    self.stack.pop()  # an OrderedDict's state: torch's _metadata (module versions), not needed
    self._target("BUILD", _MAPPINGS)


def _refusal(opcode: str):
  def refuse(unpickler: _Unpickler):
    raise UnsafeWeightFileError(
      f"{unpickler.path}: refused the pickle opcode {opcode}: a state dict needs none."
    )

  return refuse


def _opcode_table() -> dict[int, Any]:
  """Opcode byte -> how `_Unpickler` reads it: pickle's own reader, ours, or a refusal."""
  ours = {
    "DICT": _Unpickler.load_dict,
    "SETITEM": _Unpickler.load_setitem,
    "SETITEMS": _Unpickler.load_setitems,
    "APPEND": _Unpickler.load_append,
    "APPENDS": _Unpickler.load_appends,
    "BUILD": _Unpickler.load_build,
  }
  plain = (
    "PROTO",
    "FRAME",
    "STOP",
    "MARK",
    "POP",
    "POP_MARK",
    "DUP",
    "NONE",
    "NEWTRUE",
    "NEWFALSE",
    "INT",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG",
    "LONG1",
    "LONG4",
    "FLOAT",
    "BINFLOAT",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "EMPTY_TUPLE",
    "TUPLE",
    "TUPLE1",
    "TUPLE2",
    "TUPLE3",
    "EMPTY_LIST",
    "LIST",
    "EMPTY_DICT",
    "GET",
    "BINGET",
    "LONG_BINGET",
    "PUT",
    "BINPUT",
    "LONG_BINPUT",
    "MEMOIZE",
    "GLOBAL",
    "STACK_GLOBAL",
    "REDUCE",
    "BINPERSID",
  )
  names = {
    getattr(pickle, name)[0]: name
    for name in dir(pickle)
    if name.isupper()
    and isinstance(getattr(pickle, name), bytes)
    and len(getattr(pickle, name)) == 1
  }
  table = {op: _refusal(names.get(op, f"byte {op:#04x}")) for op in range(256)}
  table.update(
    {
      getattr(pickle, name)[0]: pickle._Unpickler.dispatch[getattr(pickle, name)[0]]  # pylint: disable=protected-access
      for name in plain
    }
  )
  table.update({getattr(pickle, name)[0]: reader for name, reader in ours.items()})
  return table


_Unpickler.dispatch = _opcode_table()


def _flat_tensors(obj, path: str) -> dict[str, _TensorRecord]:
  """The tensor records of the unpickled object, nested dicts flattened with dotted names.

  Each dict is walked once: one met a second time (shared, or inside itself) is refused.
  """
  if type(obj) not in _MAPPINGS:
    kind = "single tensor" if type(obj) is _TensorRecord else type(obj).__name__  # pylint: disable=unidiomatic-typecheck
    raise WeightFileError(f"{path}: holds a {kind}; expected a dict of tensors (a state dict).")
  flat, seen = {}, {id(obj): "the top level"}

  def visit(tree: dict, prefix: str, depth: int):
    if depth > _MAX_DEPTH:
      raise WeightFileError(f"{path}: dicts nested deeper than {_MAX_DEPTH} at {quote(prefix)}.")
    for key, value in tree.items():
      if type(value) is not _TensorRecord and type(value) not in _MAPPINGS:  # pylint: disable=unidiomatic-typecheck
        continue  # numbers, strings, lists: not weights
      name = _name(prefix, key, path)
      if type(value) is _TensorRecord:  # pylint: disable=unidiomatic-typecheck
        if name in flat:
          raise WeightFileError(
            f"{path}: the name {quote(name)} occurs twice once nested dicts are flattened."
          )
        flat[name] = value
      elif id(value) in seen:
        raise WeightFileError(
          f"{path}: the dict at {quote(name)} is also at"
          f" {quote(seen[id(value)])}: shared or recursive dicts are refused."
        )
      else:
        seen[id(value)] = name
        visit(value, name + ".", depth + 1)

  visit(obj, "", 0)
  return flat


def _name(prefix: str, key, path: str) -> str:
  """`prefix` + `key`, a str or an int (optimizer states); at most _MAX_NAME_CHARS long."""
  if type(key) is int and abs(key) < 2**64:  # pylint: disable=unidiomatic-typecheck
    key = str(key)
  if type(key) is not str:  # pylint: disable=unidiomatic-typecheck
    raise WeightFileError(
      f"{path}: the key {quote(key)} under {quote(prefix)} names a tensor or"
      " dict; such keys are str or int."
    )
  if len(prefix) + len(key) > _MAX_NAME_CHARS:
    raise WeightFileError(
      f"{path}: the name {quote(prefix + key[:_QUOTE_CHARS])} is longer than"
      f" {_MAX_NAME_CHARS} characters."
    )
  return prefix + key


@dataclasses.dataclass(frozen=True)
class _View:
  """A checked tensor: `shape` elements of storage `key` from `offset`, `strides` apart (elements)."""

  key: str
  dtype: np.dtype
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]  # 0 along axes of size 1
  negate: bool  # torch's neg bit: the storage holds minus the values

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def _index_tuple(x) -> tuple[int, ...] | None:
  if type(x) not in (tuple, list) or len(x) > _MAX_DIMS or not all(map(_is_index, x)):
    return None
  return tuple(x)


def _checked_view(record: _TensorRecord, name: str, path: str) -> _View:
  """The one check of a tensor record against its storage, once the whole pickle is read."""

  def fail(problem: str):
    raise WeightFileError(f"{path}: tensor {quote(name)}: {problem}.")

  storage = record.storage
  if type(storage) is not _Storage:  # pylint: disable=unidiomatic-typecheck
    fail(f"its storage is a {type(storage).__name__}, not a torch storage")
  offset, shape, strides = record.offset, _index_tuple(record.size), _index_tuple(record.stride)
  if not _is_index(offset) or shape is None or strides is None or len(shape) != len(strides):
    fail(
      f"storage offset {quote(offset)}, size {quote(record.size)} and stride"
      f" {quote(record.stride)}: expected non-negative int64 integers, size and stride of one"
      f" length (at most {_MAX_DIMS})"
    )
  metadata = {} if record.metadata is None else record.metadata
  if type(metadata) not in _MAPPINGS or {k for k, v in metadata.items() if v} - {"neg"}:
    fail(f"metadata {quote(metadata)}: only torch's neg bit is supported")  # conj: complex only
  count = math.prod(shape)
  if count > storage.numel:
    fail(
      f"{count} elements from a storage of {storage.numel}: a view larger than its storage"
      " (an expanded, stride-0 tensor) is not materialised"
    )
  if not count and math.prod(n or 1 for n in shape) > _MAX_EMPTY_EXTENT:
    fail(f"an empty tensor of size {shape}: its other dims multiply to over {_MAX_EMPTY_EXTENT}")
  last = offset + sum((n - 1) * s for n, s in zip(shape, strides)) if count else offset - 1
  if last >= storage.numel:  # as_strided does not check: reading past would read foreign memory.
    fail(
      f"offset {offset}, size {shape} and stride {strides} reach element {last} of a storage"
      f" of {storage.numel}"
    )
  return _View(
    storage.key,
    storage.dtype,
    offset,
    shape,
    tuple(s if n > 1 else 0 for n, s in zip(shape, strides)),
    negate=bool(metadata.get("neg")),
  )


def _checked_views(obj, path: str, file_size: int) -> dict[str, _View]:
  """The checked views of the unpickled object's tensors, totalling at most `file_size` bytes."""
  views, total = {}, 0
  for name, record in _flat_tensors(obj, path).items():
    views[name] = _checked_view(record, name, path)
    total += views[name].nbytes
    if total > file_size:
      raise WeightFileError(
        f"{path}: the tensors up to {quote(name)} need {total} bytes, more"
        f" than the file's {file_size}: a file yields at most its own size."
      )
  return views


def _tensor_array(storage: np.ndarray, view: _View) -> np.ndarray:
  """The C-contiguous copy of `view` of the 1-D `storage` (of the numel the pickle states)."""
  if 0 in view.shape:
    return np.zeros(view.shape, storage.dtype)
  strided = np.lib.stride_tricks.as_strided(
    storage[view.offset :],
    view.shape,
    [s * storage.itemsize for s in view.strides],
    writeable=False,
  )
  array = np.array(strided, order="C")
  return np.negative(array, out=array) if view.negate else array


def _build_arrays(
  views: dict[str, _View], storages: Iterator[tuple[str, np.ndarray]], path: str
) -> dict[str, np.ndarray]:
  """Arrays of `views`, in their order; `storages` yields each needed record once, in any order."""
  names_by_key = collections.defaultdict(list)
  for name, view in views.items():
    names_by_key[view.key].append(name)
  arrays = {}
  for key, storage in storages:  # one record in memory at a time, besides the arrays built
    for name in names_by_key.pop(key, []):
      arrays[name] = _tensor_array(storage, views[name])
  if names_by_key:
    raise WeightFileError(
      f"{path}: no data for the storages {quote(sorted(names_by_key))} of"
      f" tensors {quote(sorted(n for ns in names_by_key.values() for n in ns))}."
    )
  return {name: arrays[name] for name in views}


def _storage_array(data: bytes, storage: _Storage, big_endian: bool, path: str) -> np.ndarray:
  """The storage's elements from its record's bytes, swapped to native order when big-endian."""
  if len(data) != storage.numel * storage.dtype.itemsize:
    raise WeightFileError(
      f"{path}: storage {quote(storage.key)} has {len(data)} bytes, its"
      f" pickle states {storage.numel} elements of {storage.dtype}."
    )
  if big_endian and storage.dtype.itemsize > 1:
    data = np.frombuffer(data, np.uint8).reshape(-1, storage.dtype.itemsize)[:, ::-1].tobytes()
  return np.frombuffer(data, storage.dtype)


def _zip_record(archive: zipfile.ZipFile, name: str, max_bytes: int, path: str) -> bytes:
  """Record `name`, refused unless its header states at most `max_bytes`; never inflated further."""
  info = archive.NameToInfo.get(name)
  if info is None:
    raise WeightFileError(f"{path}: no zip record {quote(name)}.")
  if info.file_size > max_bytes:
    raise WeightFileError(
      f"{path}: zip record {quote(name)} states {info.file_size} bytes;"
      f" at most {max_bytes} are read."
    )
  with archive.open(info) as f:  # zipfile stops inflating at the header's file_size
    return f.read(max_bytes)


def _load_torch_zip(path: str, file_size: int) -> dict[str, np.ndarray]:
  with files.open_for_read(path) as f:
    is_zip = zipfile.is_zipfile(f)
  if not is_zip:
    raise WeightFileError(
      f"{path}: starts like a zip file (a torch.save file) but has no"
      " zip directory: truncated or damaged."
    )
  with files.open_for_read(path) as f, zipfile.ZipFile(f) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise WeightFileError(
        f"{path}: a zip file but not a torch.save file: expected one"
        f" <prefix>/data.pkl, found {quote(pickles)}."
      )
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = b"little"
    if prefix + "byteorder" in archive.NameToInfo:
      byteorder = _zip_record(archive, prefix + "byteorder", _MAX_BYTEORDER_BYTES, path)
    if byteorder not in (b"little", b"big"):
      raise WeightFileError(f"{path}: unknown byteorder record {quote(byteorder)}.")
    unpickler = _Unpickler(io.BytesIO(_zip_record(archive, pickles[0], file_size, path)), path)
    views = _checked_views(unpickler.load(), path, file_size)

    def storages():
      for key in dict.fromkeys(view.key for view in views.values()):
        storage = unpickler.storages[key]
        data = _zip_record(
          archive, f"{prefix}data/{key}", storage.numel * storage.dtype.itemsize, path
        )
        yield key, _storage_array(data, storage, byteorder == b"big", path)

    return _build_arrays(views, storages(), path)


class _FileEnd:
  """A binary file's read and readline, refusing a read past its end before allocating it."""

  def __init__(self, file: BinaryIO, size: int, path: str):
    self.file, self.size, self.path = file, size, path
    self.readline = file.readline

  def read(self, n: int) -> bytes:
    if n > self.size - self.file.tell():
      raise WeightFileError(
        f"{self.path}: the pickle reads {n} bytes at byte {self.file.tell()}"
        f" of {self.size}: truncated."
      )
    return self.file.read(n)


def _load_torch_legacy(path: str, file_size: int) -> dict[str, np.ndarray]:
  with files.open_for_read(path) as f:
    reader = _FileEnd(f, file_size, path)

    def next_pickle():
      return _Unpickler(reader, path).load()

    if next_pickle() != _LEGACY_MAGIC:
      raise WeightFileError(
        f"{path}: a pickle but not a torch.save file (no magic number); expected {_FORMATS}."
      )
    if (protocol := next_pickle()) != _LEGACY_PROTOCOL:
      raise WeightFileError(
        f"{path}: legacy torch protocol {quote(protocol)}, expected {_LEGACY_PROTOCOL}."
      )
    next_pickle()  # sys_info: the writer's byte order; storages are written little-endian anyway.
    unpickler = _Unpickler(reader, path)
    views = _checked_views(unpickler.load(), path, file_size)
    keys = next_pickle()
    if (
      type(keys) is not list
      or not all(type(k) is str for k in keys)  # pylint: disable=unidiomatic-typecheck
      or sorted(set(keys)) != sorted(keys)
      or not set(keys) <= set(unpickler.storages)
    ):
      raise WeightFileError(
        f"{path}: storage keys {quote(keys)} do not match the storages pickled."
      )
    needed = {view.key for view in views.values()}

    def storages():
      for key in keys:
        storage = unpickler.storages[key]
        if int.from_bytes(reader.read(8), "little") != storage.numel:
          raise WeightFileError(
            f"{path}: storage {quote(key)}'s record does not hold the"
            f" {storage.numel} elements its pickle states."
          )
        nbytes = storage.numel * storage.dtype.itemsize
        if key in needed:
          yield key, _storage_array(reader.read(nbytes), storage, False, path)
        elif nbytes <= file_size - f.tell():
          f.seek(nbytes, os.SEEK_CUR)

    return _build_arrays(views, storages(), path)
