"""The torch-free weight-file reader against files written by torch and safetensors themselves."""

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile

import hypothesis
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import strategies as st

import hostile_weightfiles
from diffusion_jax import weightfiles
from diffusion_jax.weightfiles import UnsafeWeightFileError, WeightFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    safetensors.torch.save_file(
      {k: v.resolve_neg().contiguous().clone() for k, v in obj.items()}, path
    )
  return path


def _assert_equal(loaded: dict, expected: dict, ordered: bool = True):
  """Equal bits, dtypes and shapes; in the saved order unless `ordered` is False (safetensors)."""
  assert list(loaded) == list(expected) if ordered else sorted(loaded) == sorted(expected)
  for name, tensor in expected.items():
    want = _numpy(tensor)
    got = loaded[name]
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert got.flags.c_contiguous and got.flags.writeable, name
    np.testing.assert_array_equal(
      got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8), err_msg=name
    )


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
  _assert_equal(
    weightfiles.load(_save(parameters, tmp_path / "params.pt", fmt)),
    {k: v.detach() for k, v in parameters.items()},
  )

  checkpoint = {
    "state_dict": model.state_dict(),
    "epoch": 3,
    "note": "x",
    "lrs": [0.1, 0.2],
    "ema": {"inner": {"w": torch.ones(2)}},
  }
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
@pytest.mark.parametrize(
  "function,global_name",
  [(os.system, "posix.system"), (eval, "builtins.eval"), (exec, "builtins.exec")],
)
def test_code_in_the_pickle_is_refused(tmp_path, fmt, function, global_name):
  marker = tmp_path / "pwned"
  command = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w').close()"
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
    "truncated_zip": zip_bytes[: len(zip_bytes) // 2],
    "corrupted_zip": zip_bytes.replace(b"_rebuild_tensor_v2", b"_rebuild_tensor_v3"),  # bad CRC
    "truncated_legacy": legacy_bytes[:-100],
    "truncated_safetensors": safe_bytes[:-100],
    "png": png,
    "text": b"model.weight = [1, 2, 3]\n",
    "empty": b"",
    "plain_pickle": pickle.dumps({"w": [1.0, 2.0]}, protocol=2),
    "single_tensor": _save(torch.ones(2), tmp_path / "t", "zip").read_bytes(),  # not a dict
  }


@pytest.mark.parametrize(
  "kind",
  [
    "truncated_zip",
    "corrupted_zip",
    "truncated_legacy",
    "truncated_safetensors",
    "png",
    "text",
    "empty",
    "plain_pickle",
    "single_tensor",
  ],
)
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
  code = (
    "import sys, diffusion_jax.weightfiles; "
    "sys.exit('torch' in sys.modules or 'torch._utils' in sys.modules)"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


# ----------------------------------------------------------------------------- hostile files

MEMORY_LIMIT = 1536 << 20  # address space of the reading process: Python, numpy and 1.5 GiB
CPU_LIMIT_S = 120  # a backstop only: a reader stuck walking 2^40 paths is killed, and fails
# Loads each file given, one JSON line per file, under the limits above.
_READER = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
resource.setrlimit(resource.RLIMIT_CPU, ({CPU_LIMIT_S}, {CPU_LIMIT_S}))
from diffusion_jax import weightfiles
for path in sys.argv[1:]:
  try:
    result = {{"arrays": {{k: v.tolist() for k, v in weightfiles.load(path).items()}}}}
  except Exception as e:
    result = {{"error": type(e).__name__, "message": str(e)}}
  print(json.dumps(result), flush=True)
"""


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory) -> dict[str, dict]:
  """Each case's file read in one limited subprocess: {case: result, or how the process died}."""
  folder = tmp_path_factory.mktemp("hostile")
  paths = {
    case: str(write(folder / f"{case}.pt"))
    for case, (write, _, _) in hostile_weightfiles.CASES.items()
  }
  run = subprocess.run(
    [sys.executable, "-c", _READER, *paths.values()],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
  )
  lines = run.stdout.splitlines()
  died = {"died": f"exit {run.returncode} after {len(lines)} files: {run.stderr[-500:]}"}
  return {case: json.loads(lines[i]) if i < len(lines) else died for i, case in enumerate(paths)}


@pytest.mark.parametrize("case", list(hostile_weightfiles.CASES))
def test_hostile_file_is_one_bounded_error(hostile_results, case):
  """Each hostile file: the documented error, one printable line naming what was wrong."""
  _, error, pattern = hostile_weightfiles.CASES[case]
  result = hostile_results[case]
  assert "died" not in result, result["died"]
  if error is None:
    assert result == {"arrays": {"w": hostile_weightfiles.VALUES}}
    return
  assert result.get("error") == error, result
  message = result["message"]
  assert re.search(pattern, message), message
  assert message.isprintable() and f"{case}.pt: " in message  # one line, no terminal escapes
  assert len(message) < 1000 + len(ROOT) + 200, len(message)


def test_quote_is_one_short_line():
  assert weightfiles.quote("a\x1b[2J\n" * 100).startswith("'a\\x1b[2J\\n")
  assert (
    len(weightfiles.quote("x" * 10**6)) == 200 and len(weightfiles.quote(list(range(10**5)))) < 200
  )
  deep = ()
  for _ in range(10**4):
    deep = (deep,)
  assert weightfiles.quote(deep).isprintable() and weightfiles.quote(10**5000) == "<int>"


def test_safetensors_header_over_the_cap_is_refused(tmp_path):
  """A header length over safetensors' 100 MB cap is refused before anything is read (sparse file)."""
  path = tmp_path / "big.safetensors"
  with open(path, "wb") as f:
    f.write((150_000_000).to_bytes(8, "little") + b"{")
    f.truncate(160_000_000)
  with pytest.raises(WeightFileError, match="header of 150000000 bytes; at most 100000000"):
    weightfiles.load(path)


# ----------------------------------------------------------------------------- fuzzing


def _fuzz_seeds(tmp_path_factory) -> dict[str, bytes]:
  torch.manual_seed(1)
  base = torch.randn(3, 4)
  state = {
    "w": torch.randn(5),
    "t": base.t(),
    "s": base[1:, 2:],
    "b": base,
    "h": torch.randn(3).half(),
    "p": torch.nn.Parameter(torch.randn(2)),
  }
  folder = tmp_path_factory.mktemp("seeds")
  seeds = {fmt: _save(state, folder / fmt, fmt).read_bytes() for fmt in ("zip", "legacy")}
  seeds["safetensors"] = _save(
    {k: v.detach() for k, v in state.items()}, folder / "s", "safetensors"
  ).read_bytes()
  return seeds


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory):
  return _fuzz_seeds(tmp_path_factory)


def _zip_with_pickle(data: bytes, edit) -> bytes:
  """`data` (a torch zip) with its data.pkl replaced by edit(data.pkl), CRCs made right."""
  source, target = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
  with zipfile.ZipFile(target, "w") as archive:
    for name in source.namelist():
      record = source.read(name)
      archive.writestr(name, edit(record) if name.endswith("data.pkl") else record)
  return target.getvalue()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
  data = bytearray(data)
  for position, value in edits:
    data[position % len(data)] = value
  return bytes(data[: len(data) - cut])


def _in_the_file(array: np.ndarray, data: bytes) -> bool:
  """Every element's bytes (or its negation's, or byte-swapped) occur somewhere in `data`."""
  flat = array.reshape(-1)
  candidates = (flat, -flat if flat.dtype.kind == "f" else flat, flat.byteswap())
  return all(any(c[i : i + 1].tobytes() in data for c in candidates) for i in range(flat.size))


@hypothesis.settings(
  derandomize=True,
  max_examples=300,
  deadline=None,
  database=None,
  suppress_health_check=list(hypothesis.HealthCheck),
)
@hypothesis.given(
  target=st.sampled_from(["zip_pickle", "zip", "legacy", "safetensors"]),
  edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6),
  cut=st.sampled_from([0, 0, 0, 1, 7, 100]),
)
def test_mutated_files_give_file_bytes_or_documented_errors(
  tmp_path_factory, fuzz_seeds, target, edits, cut
):
  """Byte edits of valid small files: arrays whose every element lies in the file, or an error."""
  if target == "zip_pickle":  # edits inside the pickle, past the CRC that guards the zip records
    data = _zip_with_pickle(fuzz_seeds["zip"], lambda pkl: _mutate(pkl, edits, cut))
  else:
    data = _mutate(fuzz_seeds[target], edits, cut)
  path = tmp_path_factory.getbasetemp() / "fuzzed.pt"
  path.write_bytes(data)
  try:
    arrays = weightfiles.load(path)
  except WeightFileError as e:
    assert str(e).isprintable() and str(path) in str(e), str(e)
    return
  assert sum(a.nbytes for a in arrays.values()) <= len(data)
  for name, array in arrays.items():
    assert _in_the_file(array, data), name
