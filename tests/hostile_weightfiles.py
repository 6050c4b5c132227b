"""Hostile weight files, built at test time: each attacks one guarantee of `diffusion_jax.weightfiles`.

Pickles are assembled opcode by opcode (no torch), so that each file holds
exactly the one hostile construct; zips are written record by record, so
that a header can state sizes its data does not have. `CASES` maps a case's
name to (writer, expected error class name or None for success, a regex its
message must match). Every file is a few hundred bytes to a few MB.
"""

from __future__ import annotations

import functools
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

_FLOATS = struct.pack("<4f", 1.5, -2.25, 3.0, 0.125)  # the storage "0" of most cases
VALUES = [1.5, -2.25, 3.0, 0.125]


# ---------------------------------------------------------------- a pickle assembler (protocol 2)


def string(s: str) -> bytes:
  data = s.encode("utf-8", "surrogatepass")
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def integer(n: int) -> bytes:
  if -(2**31) <= n < 2**31:
    return pickle.BININT + struct.pack("<i", n)
  data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
  return pickle.LONG1 + bytes([len(data)]) + data


def tup(*items: bytes) -> bytes:
  return pickle.MARK + b"".join(items) + pickle.TUPLE


def glob(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def call(function: bytes, *args: bytes) -> bytes:
  return function + tup(*args) + pickle.REDUCE


def put(index: int) -> bytes:
  return pickle.LONG_BINPUT + struct.pack("<I", index)


def get(index: int) -> bytes:
  return pickle.LONG_BINGET + struct.pack("<I", index)


def storage(key: str = "0", numel: int = 4, kind: str = "FloatStorage") -> bytes:
  return (
    tup(string("storage"), glob("torch", kind), string(key), string("cpu"), integer(numel))
    + pickle.BINPERSID
  )


def tensor(source: bytes, offset: int = 0, size=(4,), stride=(1,)) -> bytes:
  return call(
    glob("torch._utils", "_rebuild_tensor_v2"),
    source,
    integer(offset),
    tup(*map(integer, size)),
    tup(*map(integer, stride)),
    pickle.NEWFALSE,
    call(glob("collections", "OrderedDict")),
  )


def mapping(items: dict[str, bytes]) -> bytes:
  """A dict of pickled values, as torch's OrderedDict state dicts are written."""
  body = b"".join(string(k) + v for k, v in items.items())
  return call(glob("collections", "OrderedDict")) + pickle.MARK + body + pickle.SETITEMS


def pickled(obj: bytes) -> bytes:
  return pickle.PROTO + b"\x02" + obj + pickle.STOP


# ---------------------------------------------------------------- containers


def write_zip(path: Path, records: dict[str, bytes | tuple[bytes, int]]) -> Path:
  """A zip of stored records; a (deflated bytes, stated size) pair is a deflated record."""
  local, central, offset = [], [], 0
  for name, payload in records.items():
    if isinstance(payload, tuple):
      (data, size), method, crc = payload, 8, 0  # the CRC is checked only once all is inflated
    else:
      data, size, method, crc = payload, len(payload), 0, zlib.crc32(payload)
    fields = struct.pack(
      "<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(data), size, len(name.encode()), 0
    )
    local.append(b"PK\x03\x04" + fields + name.encode() + data)
    central.append(
      b"PK\x01\x02"
      + struct.pack("<H", 20)
      + fields
      + struct.pack("<HHHII", 0, 0, 0, 0, offset)
      + name.encode()
    )
    offset += len(local[-1])
  directory = b"".join(central)
  end = b"PK\x05\x06" + struct.pack(
    "<HHHHIIH", 0, 0, len(records), len(records), len(directory), offset, 0
  )
  path.write_bytes(b"".join(local) + directory + end)
  return path


def torch_zip(path: Path, obj: bytes, **records: bytes | tuple[bytes, int]) -> Path:
  """A torch.save zip: archive/data.pkl holding `obj`, the storage "0", then `records`."""
  return write_zip(
    path,
    {
      "archive/data.pkl": pickled(obj),
      "archive/data/0": _FLOATS,
      **{f"archive/{k.replace('__', '/')}": v for k, v in records.items()},
    },
  )


def legacy(path: Path, obj: bytes, keys=("0",), storages: bytes | None = None) -> Path:
  """A legacy torch.save file: magic, protocol, sys_info, `obj`, storage keys, storages."""
  storages = struct.pack("<q", 4) + _FLOATS if storages is None else storages
  path.write_bytes(
    pickled(integer(0x1950A86A20F9469CFC6C))
    + pickled(integer(1001))
    + pickled(pickle.EMPTY_DICT)
    + pickled(obj)
    + pickled(pickle.EMPTY_LIST + pickle.MARK + b"".join(map(string, keys)) + pickle.APPENDS)
    + storages
  )
  return path


@functools.cache
def deflated_zeros(gib: int) -> bytes:
  """A raw deflate stream of `gib` GiB of zeros in about 2 MB: one block repeated."""
  compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = compressor.compress(bytes(1 << 24)) + compressor.flush(zlib.Z_FULL_FLUSH)
  return block * (64 * gib) + b"\x03\x00"  # 64 blocks of 16 MiB a GiB; then an empty final block


# ---------------------------------------------------------------- the cases

_W = storage() + put(1)  # the storage "0", memoised at 1
_GOOD = tensor(_W) + put(2)  # the tensor 'w' of 4 floats, memoised at 2


def _build_on(target: bytes, state: bytes) -> bytes:
  """A state dict {'w': ...} after which BUILD hands `state` to `target` (then drops it)."""
  return mapping({"w": _GOOD}) + target + state + pickle.BUILD + pickle.POP


def _nested_shared(depth: int) -> bytes:
  """d0 = {'w': tensor}; d(i+1) = {'a': d(i), 'b': d(i)}: 2^depth paths through `depth` dicts."""
  obj = mapping({"w": _GOOD}) + put(100)
  for level in range(1, depth + 1):
    obj = (
      obj + pickle.POP + mapping({"a": get(99 + level), "b": get(99 + level)}) + put(100 + level)
    )
  return obj


def _nested(depth: int) -> bytes:
  return (pickle.EMPTY_DICT + string("a")) * depth + mapping({"w": _GOOD}) + pickle.SETITEM * depth


def _deep_tuple(depth: int) -> bytes:
  return pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth


_ESCAPES = "\x1b[2J\x1b]0;pwned\x07\n" * 50  # 700 characters

Writer = Callable[[Path], Path]
CASES: dict[str, tuple[Writer, str | None, str]] = {
  # BUILD and the other mutating opcodes on what the reader already holds.
  "build_rewrites_tensor": (
    lambda p: torch_zip(
      p,
      _build_on(
        get(2), tup(get(1), integer(-1), tup(integer(4)), tup(integer(1)), pickle.NEWFALSE)
      ),
    ),
    "UnsafeWeightFileError",
    r"BUILD acts on a _TensorRecord; it may act only on a dict",
  ),
  "build_rewrites_storage_type": (
    lambda p: torch_zip(
      p, _build_on(glob("torch", "FloatStorage"), tup(glob("torch", "DoubleStorage")))
    ),
    "UnsafeWeightFileError",
    r"BUILD acts on a _StorageType",
  ),
  "build_on_admitted_function": (
    lambda p: torch_zip(
      p, _build_on(glob("torch._utils", "_rebuild_tensor_v2"), mapping({"x": integer(1)}))
    ),
    "UnsafeWeightFileError",
    r"BUILD acts on a method",
  ),
  "setitem_on_tensor": (
    lambda p: torch_zip(
      p,
      mapping({"w": _GOOD}) + get(2) + string("offset") + integer(-8) + pickle.SETITEM + pickle.POP,
    ),
    "UnsafeWeightFileError",
    r"SETITEM acts on a _TensorRecord",
  ),
  "legacy_build_rewrites_tensor": (
    lambda p: legacy(
      p,
      _build_on(
        get(2), tup(get(1), integer(-1), tup(integer(4)), tup(integer(1)), pickle.NEWFALSE)
      ),
    ),
    "UnsafeWeightFileError",
    r"BUILD acts on a _TensorRecord",
  ),
  "set_of_deep_tuples": (
    lambda p: torch_zip(
      p,
      mapping({"w": _GOOD})
      + pickle.EMPTY_SET
      + pickle.MARK
      + _deep_tuple(10**6)
      + pickle.ADDITEMS
      + pickle.POP,
    ),
    "UnsafeWeightFileError",
    r"refused the pickle opcode EMPTY_SET",
  ),
  "deep_tuple_key": (
    lambda p: torch_zip(
      p,
      mapping({"w": _GOOD})
      + pickle.POP
      + pickle.EMPTY_DICT
      + _deep_tuple(10**6)
      + integer(1)
      + pickle.SETITEM,
    ),
    "WeightFileError",
    r"a dict key of type tuple",
  ),
  # Offsets, sizes and strides.
  "negative_offset": (
    lambda p: torch_zip(p, mapping({"w": tensor(_W, offset=-4)})),
    "WeightFileError",
    r"tensor 'w': storage offset -4.*non-negative int64",
  ),
  "negative_stride": (
    lambda p: torch_zip(p, mapping({"w": tensor(_W, 3, stride=(-1,))})),
    "WeightFileError",
    r"tensor 'w'.*stride \(-1,\).*non-negative",
  ),
  "past_the_storage": (
    lambda p: torch_zip(p, mapping({"w": tensor(_W, 2, size=(2, 2), stride=(1, 1))})),
    "WeightFileError",
    r"reach element 4 of a storage of 4",
  ),
  "stride0_billion": (
    lambda p: torch_zip(p, mapping({"w": tensor(_W, size=(2**30,), stride=(0,))})),
    "WeightFileError",
    r"1073741824 elements from a storage of 4",
  ),
  "views_beyond_the_file": (
    lambda p: torch_zip(
      p,
      mapping(
        {
          f"w{i}": tensor(get(1) if i else storage(numel=1024) + put(1), size=(1024,))
          for i in range(100)
        }
      ),
      data__0=bytes(4096),
    ),
    "WeightFileError",
    r"need \d+ bytes, more than the file's \d+",
  ),
  "storage_smaller_than_stated": (
    lambda p: torch_zip(p, mapping({"w": tensor(storage(numel=2**40))})),
    "WeightFileError",
    r"storage '0' has 16 bytes, its pickle states 1099511627776",
  ),
  # Containers.
  "shared_dicts": (
    lambda p: torch_zip(p, _nested_shared(40)),
    "WeightFileError",
    r"the dict at '(a\.)*b' is also at '(a\.)*a': shared or recursive",
  ),
  "recursive_dict": (
    lambda p: torch_zip(p, pickle.EMPTY_DICT + put(7) + string("self") + get(7) + pickle.SETITEM),
    "WeightFileError",
    r"the dict at 'self' is also at 'the top level'",
  ),
  "deep_dicts": (
    lambda p: torch_zip(p, _nested(10_000)),
    "WeightFileError",
    r"dicts nested deeper than 100",
  ),
  "long_names": (
    lambda p: torch_zip(p, mapping({"n" * 600: mapping({"m" * 600: _GOOD})})),
    "WeightFileError",
    r"longer than 1000 characters",
  ),
  "huge_memo_index": (lambda p: torch_zip(p, mapping({"w": _GOOD}) + put(2**32 - 1)), None, ""),
  # Zip records larger than stated or than the file.
  "inflating_storage": (
    lambda p: torch_zip(p, mapping({"w": tensor(_W)}), data__0=(deflated_zeros(2), 2 << 30)),
    "WeightFileError",
    r"'archive/data/0' states 2147483648 bytes; at most"
    r" 16 are read",
  ),
  "inflating_pickle": (
    lambda p: write_zip(p, {"archive/data.pkl": (deflated_zeros(2), 2 << 30)}),
    "WeightFileError",
    r"'archive/data.pkl' states 2147483648 bytes",
  ),
  "inflating_byteorder": (
    lambda p: torch_zip(p, mapping({"w": _GOOD}), byteorder=(deflated_zeros(2), 2 << 30)),
    "WeightFileError",
    r"'archive/byteorder' states 2147483648 bytes;"
    r" at most 8",
  ),
  "legacy_count_lies": (
    lambda p: legacy(p, mapping({"w": _GOOD}), storages=struct.pack("<q", 2**60) + _FLOATS),
    "WeightFileError",
    r"storage '0'.s record does not hold the 4 elements",
  ),
  # Foreign strings in messages.
  "escapes_in_a_name": (
    lambda p: torch_zip(p, mapping({_ESCAPES: tensor(_W, offset=-1)})),
    "WeightFileError",
    r"tensor '\\x1b\[2J\\x1b\]0;pwned\\x07\\n",
  ),
  "escapes_in_a_global": (
    lambda p: torch_zip(
      p, mapping({"w": string("os" + _ESCAPES) + string("system") + pickle.STACK_GLOBAL})
    ),
    "UnsafeWeightFileError",
    r"refused to unpickle the global 'os\\x1b",
  ),
}
