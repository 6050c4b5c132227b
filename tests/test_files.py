"""The path layer (diffusion_jax/files.py): atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_jax import files


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

