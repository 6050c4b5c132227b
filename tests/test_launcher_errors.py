"""Every launcher's documented user errors: exit status 1 and one bounded line on stderr.

Each case builds its bad input here (a truncated .npz, a damaged checkpoint,
a workdir whose config.json names `os:system`, ...). The cases of one
launcher run in one process (tests/launcher_cases.py), as `python -m launch.X`
would run them, so the table costs one start-up per launcher.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from launch import common

REPO = pathlib.Path(__file__).resolve().parent.parent


def _bad_inputs(root: pathlib.Path, run: str) -> dict[str, str]:
  """The hostile files and folders the cases name, built under `root` from the trained `run`."""
  paths = {"run": run, "empty": str(root / "empty"), "marker": str(root / "os_system_ran")}
  os.makedirs(paths["empty"])
  # A shared workdir whose config.json runs a shell command when its model is built.
  untrusted = root / "untrusted"
  untrusted.mkdir()
  config = json.loads((pathlib.Path(run) / "config.json").read_text())
  config["model"] = {"name": "os:system", "command": f"touch {paths['marker']}"}
  (untrusted / "config.json").write_text(json.dumps(config))
  paths["untrusted"] = str(untrusted)
  # The run with every checkpoint damaged (the manifests of their arrays cut short); with one
  # left intact the run would fall back to it (tests/test_checkpoint_integrity.py).
  damaged = root / "damaged"
  shutil.copytree(run, damaged)
  for manifest in (damaged / "checkpoints").rglob("manifest.ocdbt"):
    manifest.write_bytes(manifest.read_bytes()[:10])
  paths["damaged"] = str(damaged)
  # .npz files: truncated, a .npy under an .npz name, a header claiming 10^13 images.
  good = io.BytesIO()
  np.savez(good, arr_0=np.zeros((4, 8, 8, 1), np.uint8))
  (root / "truncated.npz").write_bytes(good.getvalue()[:200])
  np.save(root / "single.npy", np.zeros((4, 8, 8, 1), np.uint8))
  os.rename(root / "single.npy", root / "single.npz")
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
    header, {"descr": "|u1", "fortran_order": False, "shape": (10**13, 8, 8, 1)}
  )
  with zipfile.ZipFile(root / "huge.npz", "w") as archive:
    archive.writestr("arr_0.npy", header.getvalue() + bytes(64))
  # Outputs: a sampling folder holding someone's grid.png; an evaluation folder (of the
  # samples file good.npz) holding a report.json that no evaluation wrote.
  foreign = root / "foreign"
  foreign.mkdir()
  (foreign / "grid.png").write_bytes(b"someone else's picture")
  np.savez(root / "good.npz", arr_0=np.zeros((4, 8, 8, 1), np.uint8))
  (root / "e4" / "eval" / "digits-good").mkdir(parents=True)
  (root / "e4" / "eval" / "digits-good" / "report.json").write_text("someone else's report")
  # Conversion sources: a diffusers folder with broken JSON, a truncated torch file.
  diffusers = root / "diffusers"
  diffusers.mkdir()
  (diffusers / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": ')
  (diffusers / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
  (root / "truncated.pt").write_bytes((REPO / "tests/data/iddpm_small.pt").read_bytes()[:4096])
  # Segmentation inputs: images in a folder.
  images = root / "images"
  images.mkdir()
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(images / "a.png")
  (root / "masks").mkdir()
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / "a.png")
  return {**paths, "root": str(root), "images": str(images)}


# (launcher, case, command line with {placeholders} from _bad_inputs, what the line must name).
CASES = [
  ("launch.train", "required_flags", [], ["--config", "--workdir"]),
  (
    "launch.train",
    "missing_data_folder",
    [
      "--config=configs/digits.py:smoke",
      "--workdir={root}/t1",
      "--config.data.source=folder",
      "--config.data.path={root}/no_such_folder",
    ],
    ["{root}/no_such_folder"],
  ),
  (
    "launch.train",
    "bad_config_value",
    [
      "--config=configs/digits.py:smoke",
      "--workdir={root}/t2",
      "--config.diffusion.schedule=cubic",
    ],
    ["schedule", "cubic"],
  ),
  (
    "launch.train",
    "resume_changes_the_seed",
    ["--config=configs/digits.py:smoke", "--workdir={run}", "--config.seed=5"],
    ["Cannot resume", "seed 0 → 5"],
  ),
  (
    "launch.train",
    "damaged_checkpoint",
    ["--config=configs/digits.py:smoke", "--workdir={damaged}"],
    ["No checkpoint in {damaged}/checkpoints restores"],
  ),
  (
    "launch.train",
    "batch_size_and_devices",
    ["--config=configs/digits.py:smoke", "--workdir={root}/t3", "--config.train.batch_size=3"],
    ["train.batch_size=3", "8 devices"],
  ),
  ("launch.sample", "workdir_without_run", ["--workdir={empty}"], ["config.json", "{empty}"]),
  (
    "launch.sample",
    "batch_size_and_devices",
    ["--workdir={run}", "--batch_size=3"],
    ["--batch_size=3", "8 devices"],
  ),
  (
    "launch.sample",
    "untrusted_model_factory",
    ["--workdir={untrusted}"],
    ["'os:system'", "--trust_model_code", "{untrusted}/config.json"],
  ),
  (
    "launch.sample",
    "damaged_checkpoint",
    ["--workdir={damaged}", "--num_samples=8", "--batch_size=8", "--output={root}/s1"],
    ["{damaged}/checkpoints/"],
  ),
  (
    "launch.sample",
    "output_holds_foreign_files",
    [
      "--workdir={run}",
      "--num_samples=8",
      "--batch_size=8",
      "--steps=2",
      "--output={root}/foreign",
    ],
    ["{root}/foreign/grid.png", "--overwrite"],
  ),
  (
    "launch.evaluate",
    "truncated_npz",
    [
      "--config=configs/eval/digits.py:smoke",
      "--workdir={root}/e1",
      "--samples={root}/truncated.npz",
    ],
    ["{root}/truncated.npz", "not an .npz"],
  ),
  (
    "launch.evaluate",
    "npy_named_npz",
    ["--config=configs/eval/digits.py:smoke", "--workdir={root}/e2", "--samples={root}/single.npz"],
    ["{root}/single.npz", "single array (.npy)"],
  ),
  (
    "launch.evaluate",
    "npz_header_claims_1e13_images",
    ["--config=configs/eval/digits.py:smoke", "--workdir={root}/e3", "--samples={root}/huge.npz"],
    ["{root}/huge.npz", "(10000000000000, 8, 8, 1)"],
  ),
  (
    "launch.evaluate",
    "evaluation_folder_holds_foreign_files",
    ["--config=configs/eval/digits.py:smoke", "--workdir={root}/e4", "--samples={root}/good.npz"],
    ["{root}/e4/eval/digits-good/report.json", "--overwrite"],
  ),
  (
    "launch.evaluate",
    "untrusted_model_factory",
    ["--config=configs/eval/digits.py:smoke", "--workdir={untrusted}"],
    ["'os:system'", "--trust_model_code"],
  ),
  (
    "launch.convert",
    "malformed_diffusers_json",
    ["--input={root}/diffusers", "--workdir={root}/c1"],
    ["{root}/diffusers/config.json", "JSON"],
  ),
  (
    "launch.convert",
    "truncated_torch_file",
    ["--input={root}/truncated.pt", "--workdir={root}/c2"],
    ["{root}/truncated.pt"],
  ),
  (
    "launch.convert",
    "workdir_inside_the_input",
    ["--input={root}/diffusers", "--workdir={root}/diffusers/converted"],
    ["is inside the input", "{root}/diffusers"],
  ),
  (
    "launch.segment",
    "output_is_the_input_folder",
    ["--workdir={run}", "--input={images}", "--output={images}"],
    ["output folder '{images}' is the input"],
  ),
  (
    "launch.segment",
    "output_contains_the_input",
    ["--workdir={run}", "--input={images}/a.png", "--output={root}"],
    ["contains the input"],
  ),
  (
    "launch.segment",
    "diffusion_workdir",
    ["--workdir={run}", "--input={images}", "--output={root}/g1"],
    ["holds a diffusion run"],
  ),
  (
    "launch.segment",
    "untrusted_model_factory",
    ["--workdir={untrusted}", "--input={images}", "--output={root}/g2"],
    ["'os:system'", "--trust_model_code"],
  ),
]
# The first case again, showing its traceback: (case, command line, DIFFUSION_JAX_VERBOSE).
VERBOSE_CASES = [
  ("verbose_flag", ["--workdir={empty}", "--verbose"], ""),
  ("verbose_environment", ["--workdir={empty}"], "1"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, digits_smoke_run) -> dict[str, str]:
  return _bad_inputs(tmp_path_factory.mktemp("launcher_errors"), digits_smoke_run)


@pytest.fixture(scope="module")
def outcomes(bad_inputs) -> dict[str, dict]:
  """{case: {"status", "stderr", "traceback"}}: the cases of each launcher and value of
  DIFFUSION_JAX_VERBOSE run in one process."""
  by_launcher = collections.defaultdict(list)
  every_case = [
    *((launcher, case, argv, "") for launcher, case, argv, _ in CASES),
    *(("launch.sample", *verbose_case) for verbose_case in VERBOSE_CASES),
  ]
  for launcher, case, argv, verbose in every_case:
    by_launcher[launcher, verbose].append((case, [arg.format(**bad_inputs) for arg in argv]))
  found = {}
  for (launcher, verbose), cases in by_launcher.items():
    result = subprocess.run(
      [
        sys.executable,
        "tests/launcher_cases.py",
        launcher,
        json.dumps([argv for _, argv in cases]),
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=900,
      env={**os.environ, common.VERBOSE_ENV: verbose},
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(cases), f"{launcher}: {result.stderr[-3000:]}"
    found.update({f"{launcher}:{case}": json.loads(line) for (case, _), line in zip(cases, lines)})
  return found


@pytest.mark.parametrize(
  "launcher, case, argv, names", CASES, ids=[f"{launcher}:{case}" for launcher, case, *_ in CASES]
)
def test_user_error_is_one_line(outcomes, bad_inputs, launcher, case, argv, names):
  outcome = outcomes[f"{launcher}:{case}"]
  assert outcome["status"] == 1 and not outcome["traceback"], outcome["stderr"][-3000:]
  (line,) = outcome["stderr"].splitlines()
  assert line.startswith(f"{launcher}: ")
  for name in names:
    assert name.format(**bad_inputs) in line
  assert len(line) <= len(launcher) + len(": flags: ") + common.MAX_MESSAGE_CHARS
  assert "tensorstore_spec" not in line and "Traceback" not in line


def test_rejected_inputs_ran_no_code_and_changed_no_file(outcomes, bad_inputs):
  assert not os.path.exists(bad_inputs["marker"])  # os.system never ran
  assert (pathlib.Path(bad_inputs["root"]) / "foreign" / "grid.png").read_bytes() == (
    b"someone else's picture"
  )
  assert (
    pathlib.Path(bad_inputs["root"]) / "e4" / "eval" / "digits-good" / "report.json"
  ).read_text() == "someone else's report"
  assert os.listdir(bad_inputs["images"]) == ["a.png"]
  assert not os.path.exists(os.path.join(bad_inputs["root"], "diffusers", "converted"))


@pytest.mark.parametrize("case", [case for case, *_ in VERBOSE_CASES])
def test_verbose_shows_the_traceback(outcomes, case):
  outcome = outcomes[f"launch.sample:{case}"]
  assert outcome["status"] == 1 and outcome["traceback"]
  assert "NotFoundError: No config.json" in outcome["stderr"]  # files.PathNotFoundError


@pytest.mark.parametrize(
  "message, expected",
  [
    ("a\n  b\tc", "a b c"),
    ('restore failed [tensorstore_spec[1]=\'{"driver": "zarr"}\'] for x', "restore failed for x"),
    ("x" * 5000, "x" * (common.MAX_MESSAGE_CHARS - 1) + "…"),
  ],
  ids=["whitespace", "tensorstore_spec", "long"],
)
def test_one_line_is_bounded_and_drops_tensorstore_specs(message, expected):
  assert common.one_line(ValueError(message)) == expected
