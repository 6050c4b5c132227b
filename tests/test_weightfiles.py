"""The torch-free weight-file reader against files written by torch and safetensors themselves."""

import hashlib
import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch

from diffusion_jax import weightfiles
from diffusion_jax.weightfiles import UnsafeWeightFileError, WeightFileError


def _state_dict() -> dict[str, torch.Tensor]:
  """Every dtype admitted, and the views torch.save keeps as views of one storage."""
  torch.manual_seed(0)
  base = torch.randn(4, 5)
  return {
      "float32": torch.randn(2, 3, 3, 3),
      "float16": torch.randn(7).half(),
      "bfloat16": torch.randn(3, 2).bfloat16(),
      "float64": torch.randn(2, dtype=torch.float64),
      "int64": torch.arange(-3, 3),
      "int32": torch.arange(4, dtype=torch.int32),
      "uint8": torch.arange(250, 256, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(7),  # like BatchNorm's num_batches_tracked
      "empty": torch.zeros(0, 3),
      "base": base,
      "tied": base,  # the same tensor under two names
      "transposed": base.t(),  # non-contiguous
      "slice": base[1:3, 2:],  # storage offset 7, strides (5, 1)
      "column": base[:, 3],
      "negated": torch._neg_view(torch.randn(3)),  # torch's neg bit: the storage holds -values
  }


def _numpy(tensor: torch.Tensor) -> np.ndarray:
  tensor = tensor.resolve_neg().contiguous()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _save(obj, path, fmt: str, **kwargs):
  """Writes `obj` in one of the three formats (any suffix: load reads the content)."""
  if fmt == "zip":
    torch.save(obj, path, **kwargs)
  elif fmt == "legacy":
    torch.save(obj, path, _use_new_zipfile_serialization=False, **kwargs)
  else:  # safetensors holds neither shared nor strided tensors.
    safetensors.torch.save_file({k: v.resolve_neg().contiguous().clone() for k, v in obj.items()},
                                path)
  return path


def _assert_equal(loaded: dict, expected: dict, ordered: bool = True):
  """Equal bits, dtypes and shapes; in the saved order unless `ordered` is False (safetensors)."""
  assert list(loaded) == list(expected) if ordered else sorted(loaded) == sorted(expected)
  for name, tensor in expected.items():
    want = _numpy(tensor)
    got = loaded[name]
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert got.flags.c_contiguous and got.flags.writeable, name
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8),
                                  err_msg=name)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_round_trip(tmp_path, fmt):
  state = _state_dict()
  loaded = weightfiles.load(_save(state, tmp_path / "weights.bin", fmt))
  _assert_equal(loaded, state, ordered=fmt != "safetensors")  # safetensors sorts its names
  # Views of one storage come back as arrays of their own.
  assert not np.shares_memory(loaded["base"], loaded["tied"])
  loaded["tied"][0, 0] += 1
  assert loaded["base"][0, 0] != loaded["tied"][0, 0]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_parameters_and_nested_wrappers(tmp_path, fmt):
  model = torch.nn.Linear(3, 2)
  parameters = dict(model.named_parameters())  # nn.Parameter objects, not plain tensors
  assert all(isinstance(p, torch.nn.Parameter) for p in parameters.values())
  _assert_equal(weightfiles.load(_save(parameters, tmp_path / "params.pt", fmt)),
                {k: v.detach() for k, v in parameters.items()})

  checkpoint = {"state_dict": model.state_dict(), "epoch": 3, "note": "x", "lrs": [0.1, 0.2],
                "ema": {"inner": {"w": torch.ones(2)}}}
  loaded = weightfiles.load(_save(checkpoint, tmp_path / "ckpt.pt", fmt))
  assert list(loaded) == ["state_dict.weight", "state_dict.bias", "ema.inner.w"]
  np.testing.assert_array_equal(loaded["state_dict.weight"], model.weight.detach().numpy())


def test_big_endian_zip_records_are_swapped(tmp_path):
  state = {"w": torch.randn(3, 4), "i": torch.arange(5)}
  little = _save(state, tmp_path / "little.pt", "zip")
  big = tmp_path / "big.pt"
  sizes = {"0": 4, "1": 8}  # the storage keys of w and i, in the order torch.save met them

  def to_big(name, data):
    if name.endswith("/byteorder"):
      return b"big"
    key = name.rsplit("/data/", 1)[-1]
    if "/data/" in name and key in sizes:
      return np.frombuffer(data, np.uint8).reshape(-1, sizes[key])[:, ::-1].tobytes()
    return data

  _rewrite_zip(little, big, to_big)
  _assert_equal(weightfiles.load(big), state)


class _RunsOnUnpickle:
  """Unpickles by calling `function(argument)`: what a malicious checkpoint does."""

  def __init__(self, function, argument):
    self.function, self.argument = function, argument

  def __reduce__(self):
    return self.function, (self.argument,)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("function,global_name", [(os.system, "posix.system"),
                                                  (eval, "builtins.eval"),
                                                  (exec, "builtins.exec")])
def test_code_in_the_pickle_is_refused(tmp_path, fmt, function, global_name):
  marker = tmp_path / "pwned"
  command = (f"touch {marker}" if function is os.system
             else f"open({str(marker)!r}, 'w').close()")
  state = {"w": torch.ones(2), "payload": _RunsOnUnpickle(function, command)}
  path = _save(state, tmp_path / "evil.pt", fmt, pickle_protocol=4)  # 4: builtins, not __builtin__

  with pytest.raises(UnsafeWeightFileError) as error:
    weightfiles.load(path)
  assert global_name in str(error.value) and str(path) in str(error.value)
  assert not marker.exists()

  torch.load(path, weights_only=False)  # the file is live: torch's full unpickler runs the call.
  assert marker.exists()


def test_os_system_in_a_default_torch_save_is_named(tmp_path):
  path = _save({"payload": _RunsOnUnpickle(os.system, "true")}, tmp_path / "e.pt", "zip")
  with pytest.raises(UnsafeWeightFileError, match="posix.system"):
    weightfiles.load(path)


def test_tensor_past_its_storage_is_refused(tmp_path):
  """A size larger than the storage would make as_strided read foreign memory."""
  honest = _save({"w": torch.arange(4.0)}, tmp_path / "honest.pt", "zip")
  lying = tmp_path / "lying.pt"
  size_4, size_9 = b"Q K\x00K\x04\x85".replace(b" ", b""), b"Q K\x00K\x09\x85".replace(b" ", b"")

  def enlarge(name, data):
    if name.endswith("/data.pkl"):
      assert data.count(size_4) == 1
      return data.replace(size_4, size_9)
    return data

  _rewrite_zip(honest, lying, enlarge)
  with pytest.raises(WeightFileError, match="9 elements from a storage of 4"):
    weightfiles.load(lying)


def _rewrite_zip(src, dst, edit):
  with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w") as target:
    for name in source.namelist():
      target.writestr(name, edit(name, source.read(name)))


def _damaged_files(tmp_path):
  state = {"w": torch.randn(64, 64)}
  zip_bytes = _save(state, tmp_path / "z", "zip").read_bytes()
  legacy_bytes = _save(state, tmp_path / "l", "legacy").read_bytes()
  safe_bytes = _save(state, tmp_path / "s", "safetensors").read_bytes()
  png = b"\x89PNG\r\n\x1a\n" + bytes(64)
  return {
      "truncated_zip": zip_bytes[:len(zip_bytes) // 2],
      "corrupted_zip": zip_bytes.replace(b"_rebuild_tensor_v2", b"_rebuild_tensor_v3"),  # bad CRC
      "truncated_legacy": legacy_bytes[:-100],
      "truncated_safetensors": safe_bytes[:-100],
      "png": png,
      "text": b"model.weight = [1, 2, 3]\n",
      "empty": b"",
      "plain_pickle": pickle.dumps({"w": [1.0, 2.0]}, protocol=2),
      "single_tensor": _save(torch.ones(2), tmp_path / "t", "zip").read_bytes(),  # not a dict
  }


@pytest.mark.parametrize("kind", ["truncated_zip", "corrupted_zip", "truncated_legacy",
                                  "truncated_safetensors", "png", "text", "empty",
                                  "plain_pickle", "single_tensor"])
def test_damaged_and_foreign_files(tmp_path, kind):
  path = tmp_path / f"{kind}.pth"
  path.write_bytes(_damaged_files(tmp_path)[kind])
  with pytest.raises(WeightFileError) as error:
    weightfiles.load(path)
  assert str(path) in str(error.value)
  assert not isinstance(error.value, UnsafeWeightFileError)


def test_sha256(tmp_path):
  data = np.random.default_rng(0).bytes(3_000_001)
  path = tmp_path / "blob"
  path.write_bytes(data)
  assert weightfiles.sha256(path) == hashlib.sha256(data).hexdigest()
  assert weightfiles.sha256(path, chunk_bytes=7) == hashlib.sha256(data).hexdigest()


def test_import_does_not_import_torch():
  code = ("import sys, diffusion_jax.weightfiles; "
          "sys.exit('torch' in sys.modules or 'torch._utils' in sys.modules)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
