"""The path layer (diffusion_jax/files.py): atomic writes, and .npz files read with bounds."""

from __future__ import annotations

import io
import pathlib
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from diffusion_jax import files

REPO = pathlib.Path(__file__).resolve().parent.parent


class _Unpicklable:
  """An object np.savez fails to write, after the arrays before it are written."""

  def __reduce__(self):
    raise RuntimeError("the writer failed midway")


@pytest.fixture(params=["local", "bucket"])
def folder(request, tmp_path) -> str:
  """An empty folder: on the local disk, or in the GCS emulator's bucket (an object store)."""
  if request.param == "local":
    return str(tmp_path)
  request.getfixturevalue("gcs")
  return f"gs://bucket/atomic/{tmp_path.name}"


def test_a_write_failing_midway_leaves_the_earlier_file_and_no_temporary(folder):
  """A failure inside atomic_path's block, and a writer (np.savez) failing after writing part
  of the file, each leave the earlier file as it was and nothing else in the folder."""
  target = files.join(folder, "a.npz")
  files.save_npz(target, x=np.arange(3))
  with pytest.raises(RuntimeError, match="midway"):
    with files.atomic_path(target) as temporary:
      with open(temporary, "wb") as f:
        f.write(b"half of a file")
      raise RuntimeError("failed midway")
  with pytest.raises(RuntimeError, match="midway"):
    files.save_npz(target, big=np.ones(1 << 16), bad=np.array([_Unpicklable()], object))
  np.testing.assert_array_equal(files.load_npz(target)["x"], np.arange(3))
  assert files.listdir(folder) == ["a.npz"]


# ----------------------------------------------------------------------------- .npz bounds

MEMORY_LIMIT = 1536 << 20  # address space of the reading process, as tests/test_weightfiles.py's
STATED_BYTES = 4_000_000_000  # what the crafted member states (the most a zip32 header holds)
# Loads each .npz given under the limit: one line per file, its error or its array shapes.
_LIMITED_LOADER = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
from diffusion_jax import files
for path in sys.argv[1:]:
  try:
    print({{k: v.shape for k, v in files.load_npz(path).items()}}, flush=True)
  except ValueError as error:
    print(error, flush=True)
"""


def _npy_header(count: int) -> bytes:
  """The .npy header of a uint8 [count] array."""
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
    header, {"descr": "|u1", "fortran_order": False, "shape": (count,)}
  )
  return header.getvalue()


def _claiming_npz(path: pathlib.Path, compression: int) -> pathlib.Path:
  """A few hundred bytes whose one array's .npy header and zip headers agree on STATED_BYTES."""
  header = _npy_header(STATED_BYTES - len(_npy_header(STATED_BYTES)))
  with zipfile.ZipFile(path, "w", compression) as archive:
    archive.writestr("arr_0.npy", header + bytes(64))
  data = bytearray(path.read_bytes())
  for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local, central headers
    at = data.index(signature) + offset
    data[at : at + 4] = struct.pack("<I", STATED_BYTES)
  path.write_bytes(bytes(data))
  return path


def test_an_npz_stating_more_than_its_bytes_hold_is_refused_before_allocating(tmp_path):
  """A stored or deflated array stating 4 GB in a file of a few hundred bytes: one line naming
  the file, under a 1.5 GiB address-space limit; a deflated file of zeros (ratio ~1000) loads."""
  paths = [
    _claiming_npz(tmp_path / f"{name}.npz", compression)
    for name, compression in (("stored", zipfile.ZIP_STORED), ("deflated", zipfile.ZIP_DEFLATED))
  ]
  np.savez_compressed(tmp_path / "zeros.npz", x=np.zeros(1 << 22, np.uint8))
  run = subprocess.run(
    [sys.executable, "-c", _LIMITED_LOADER, *map(str, paths), str(tmp_path / "zeros.npz")],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  lines = run.stdout.splitlines()
  assert run.returncode == 0 and len(lines) == 3, run.stderr[-3000:]
  for path, line in zip(paths, lines):
    assert line.startswith(
      f"{path} is not an .npz file: array 'arr_0.npy' states {STATED_BYTES:,} bytes"
    ), line
  assert lines[2] == "{'x': (4194304,)}"
