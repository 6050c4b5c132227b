"""gs:// workdirs end to end, against a local GCS emulator (tests/gcs_emulator.py).

Every launcher runs as a subprocess in a fresh empty directory, as a user on a
new VM would, with --workdir=gs://bucket/...; after each, that directory must
still be empty: nothing may land in a local folder named "gs:". A 2-process
training on the bucket (launch/tpu_pod.sh) equals the same job on a local disk
(launch/slurm.sbatch): tests/test_cluster_launchers.py.
"""

import io
import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util

from configs import segmentation_cells
from diffusion_jax import checkpoint, files, images, runs, weightfiles
from diffusion_jax.data import sources
from diffusion_jax.segmentation import synthetic
from diffusion_jax.train import loop, run_config

import evaluation_numbers  # tests/evaluation_numbers.py
import gcs_emulator  # tests/gcs_emulator.py
import local_jobs  # tests/local_jobs.py

REPO = local_jobs.REPO
CONFIG = f"--config={REPO}/configs/digits.py:smoke"
SAMPLE_FLAGS = ["--num_samples=12", "--batch_size=8", "--steps=2", "--sampler=ddim"]
EVAL_CONFIG = f"--config={REPO}/configs/eval/digits.py:smoke"


def _launch(cwd, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """`python ARGS` in `cwd` (the repository importable, the emulator's variables inherited)."""
  return subprocess.run(
    [sys.executable, *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, PYTHONPATH=REPO, **(env or {})),
  )


def _succeeded(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr


def _png(path: str) -> np.ndarray:
  """The pixels of the PNG file at `path` (local or gs://)."""
  return np.asarray(Image.open(io.BytesIO(files.read_bytes(path))))


def _ema(workdir: str) -> dict:
  """The EMA parameters and step of `workdir`'s latest checkpoint, read here from the bucket."""
  model = runs.load_ema_for_sampling(workdir)
  return {"step": model.step, "ema_params": jax.device_get(model.params)}


@pytest.fixture(scope="module")
def trained(gcs, tmp_path_factory):
  """gs://bucket/run: the smoke run stopped by SIGTERM after step 2, then resumed to step 4
  logging every step (a change its config_history.jsonl records); gs://bucket/unbroken: the
  same run without the stop. Each launcher ran in an empty directory."""
  cwd = tmp_path_factory.mktemp("cwd")
  logs = {
    "unbroken": _succeeded(
      _launch(cwd, "-m", "launch.train", CONFIG, "--workdir=gs://bucket/unbroken")
    ),
    "stopped": _succeeded(
      _launch(
        cwd,
        f"{REPO}/tests/hooked_launch.py",
        "launch.train",
        CONFIG,
        "--workdir=gs://bucket/run",
        env={"TEST_SIGTERM_AFTER_STEP": "2"},
      )
    ),
    "resumed": _succeeded(
      _launch(
        cwd, "-m", "launch.train", CONFIG, "--workdir=gs://bucket/run", "--config.train.log_every=1"
      )
    ),
  }
  return cwd, logs


def test_training_is_preempted_and_resumes_from_the_bucket_bit_identically(trained):
  cwd, logs = trained
  assert "Stop requested (SIGTERM): saved step 2 and stopping." in logs["stopped"]
  assert "Restored checkpoint of step 2 from gs://bucket/run/checkpoints." in logs["resumed"]
  assert "Wrote 4 samples to gs://bucket/run/samples/step_00000004.png." in logs["resumed"]
  jax.tree.map(np.testing.assert_array_equal, _ema("gs://bucket/run"), _ema("gs://bucket/unbroken"))
  run = files.listdir("gs://bucket/run")
  assert {"config.json", "checkpoints", "samples"} <= set(run)
  assert any(name.startswith("events.out.tfevents.") for name in run)  # TensorBoard, without TF
  assert files.listdir("gs://bucket/run/checkpoints") == ["2", "4"]
  assert files.read_json("gs://bucket/run/config.json")["train"]["num_steps"] == 4
  history = files.read_text(files.join("gs://bucket/run", run_config.HISTORY_FILE))
  assert [(entry["step"], entry["changes"]) for entry in map(json.loads, history.splitlines())] == [
    (2, {"train.log_every": [2, 1]})
  ]  # one line per resume that changed something
  assert run_config.HISTORY_FILE not in files.listdir("gs://bucket/unbroken")
  assert os.listdir(cwd) == []


def test_sampling_reads_and_writes_the_bucket_and_resumes(trained, tmp_path):
  """launch.sample from another directory: default output in the run; a rerun keeps finished
  batches (a marked one stays marked) and redraws deleted ones, equal to the first draw."""
  output = "gs://bucket/run/samples/draw"
  sample = lambda: _succeeded(
    _launch(
      tmp_path,
      "-m",
      "launch.sample",
      "--workdir=gs://bucket/run",
      f"--output={output}",
      *SAMPLE_FLAGS,
    )
  )
  sample()
  first = files.load_npz(files.join(output, "samples.npz"))["arr_0"]
  assert first.shape == (12, 8, 8, 1) and first.std() > 0
  assert files.read_json(files.join(output, "settings.json"))["workdir"] == "gs://bucket/run"
  assert _png(files.join(output, "grid.png")).size > 0

  marked = np.full_like(files.load_npz(files.join(output, "batch_000000.npz"))["arr_0"], 7)
  files.save_npz(files.join(output, "batch_000000.npz"), arr_0=marked)
  files.remove(files.join(output, "batch_000001.npz"))
  files.remove(files.join(output, "samples.npz"))
  sample()
  resumed = files.load_npz(files.join(output, "samples.npz"))["arr_0"]
  np.testing.assert_array_equal(resumed[:8], marked)  # kept, not redrawn
  np.testing.assert_array_equal(resumed[8:], first[8:])  # redrawn with the same key
  assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def evaluations(trained, tmp_path_factory):
  """(the directory they ran in, {process count: (report, logs)}): launch.evaluate of the
  smoke eval config as 1 process x 4 devices on gs://bucket/run, and as 2 x 2 on
  gs://bucket/unbroken, which holds the same parameters (the first test asserts it)."""
  cwd = tmp_path_factory.mktemp("evaluate_cwd")
  runs = {}
  for processes, workdir in ((1, "gs://bucket/run"), (2, "gs://bucket/unbroken")):
    logs = local_jobs.run_job(
      ["-m", "launch.evaluate", EVAL_CONFIG, f"--workdir={workdir}"],
      processes,
      4 // processes,
      cwd=str(cwd),
      extra_env={"PYTHONPATH": REPO},
    )
    runs[processes] = files.read_json(f"{workdir}/eval/digits-step4/report.json"), logs
  return cwd, runs


def _scalars(folder: str) -> dict[str, float]:
  """The TensorBoard scalars of the event files in `folder` (local or gs://), by tag."""
  with tempfile.TemporaryDirectory() as local:
    for name in files.listdir(folder):
      if name.startswith("events.out.tfevents."):
        files.write_bytes(os.path.join(local, name), files.read_bytes(files.join(folder, name)))
    run = plugin_event_accumulator.EventAccumulator(local).Reload()
    return {
      tag: float(tensor_util.make_ndarray(event.tensor_proto))
      for tag in run.PluginTagToContent("scalars")
      for event in run.Tensors(tag)
    }


@pytest.mark.gloo
def test_evaluation_writes_its_report_caches_and_scalars_to_the_bucket(evaluations):
  cwd, runs = evaluations
  report, _ = runs[1]
  out_dir = "gs://bucket/run/eval/digits-step4"
  assert report["workdir"] == "gs://bucket/run"  # as given, not resolved against the cwd
  reference = report["references"]["digits_classifier"]["path"]
  assert reference.startswith("gs://bucket/run/eval/reference-digits_classifier-")
  assert files.load_npz(reference)["mu"].shape == (64,)
  written = files.listdir(out_dir)
  (nll_dir,) = [name for name in written if name.startswith("nll-")]
  assert files.listdir(files.join(out_dir, nll_dir)) == ["batch_000000.npz"]  # 8 examples
  (samples_dir,) = [name for name in written if name.startswith("samples-")]
  assert files.load_npz(files.join(out_dir, samples_dir, "samples.npz"))["arr_0"].shape == (
    20,
    8,
    8,
    1,
  )
  scalars = _scalars(out_dir)
  assert scalars["nll/bpd"] == pytest.approx(report["nll"]["bpd"], rel=1e-6)  # float32
  assert scalars["real_floor/fd_digits"] == pytest.approx(
    report["real_floor"]["fd_digits"], rel=1e-6
  )
  assert os.listdir(cwd) == []


@pytest.mark.gloo
def test_two_process_evaluation_on_the_bucket_reports_the_numbers_of_one(evaluations):
  _, runs = evaluations
  (one, _), (two, logs) = runs[1], runs[2]
  assert "Process 1 of 2, 2 local / 4 global devices" in logs[1]
  assert two["workdir"] == "gs://bucket/unbroken"
  evaluation_numbers.assert_same_numbers(two, one)


def test_evaluation_reads_samples_reference_and_inception_weights_from_the_bucket(
  evaluations, random_inception_weights, tmp_path
):
  """The first evaluation's samples scored again from the bucket: the same fd_digits (against
  the reference statistics it cached there), and a FID with Inception weights and reference
  statistics read from gs://."""
  _, runs = evaluations
  first, _ = runs[1]
  out_dir = "gs://bucket/run/eval/digits-step4"
  (samples_dir,) = [name for name in files.listdir(out_dir) if name.startswith("samples-")]
  samples = files.join(out_dir, samples_dir, "samples.npz")
  weights, reference = "gs://bucket/inputs/inception.pth", "gs://bucket/inputs/reference.npz"
  with open(random_inception_weights, "rb") as f:
    files.write_bytes(weights, f.read())
  files.save_npz(reference, mu=np.zeros(2048), sigma=np.eye(2048))
  _succeeded(
    _launch(
      tmp_path,
      "-m",
      "launch.evaluate",
      EVAL_CONFIG,
      "--workdir=gs://bucket/run",
      f"--samples={samples}",
      f"--reference={reference}",
      "--config.metrics=fd_digits,fid",
      "--config.real_floor=False",
      f"--config.inception_weights={weights}",
      "--config.inception_sha256_prefix=",
    )
  )
  report = files.read_json("gs://bucket/run/eval/digits-samples/report.json")
  (scores,) = report["runs"]
  assert scores["samples_file"] == samples and scores["num_samples"] == 20
  assert scores["fd_digits"] == pytest.approx(
    first["runs"][0]["fd_digits"], rel=evaluation_numbers.FD_TOLERANCE
  )
  assert (
    report["references"]["digits_classifier"]["path"]
    == (first["references"]["digits_classifier"]["path"])
  )  # the cache, read from the bucket
  assert report["references"]["inception"]["path"] == reference
  inception = report["feature_networks"]["inception"]
  assert inception["weights"] == weights
  assert inception["sha256"] == weightfiles.sha256(random_inception_weights)
  assert np.isfinite(scores["fid"]) and scores["fid"] > 0
  assert os.listdir(tmp_path) == []


def test_convert_reads_its_input_from_the_bucket_and_writes_a_run_there(gcs, tmp_path):
  source = os.path.join(REPO, "tests", "data", "pytorch_diffusion_small.pt")
  files.write_bytes("gs://bucket/weights/model-790000.ckpt", open(source, "rb").read())
  result = _succeeded(
    _launch(
      tmp_path,
      "-m",
      "launch.convert",
      "--input=gs://bucket/weights/model-790000.ckpt",
      "--workdir=gs://bucket/converted",
      "--",
      "--resolution",
      "16",
    )
  )
  record = files.read_json("gs://bucket/converted/convert.json")
  assert record["sha256"] == weightfiles.sha256(source), result
  assert record["path"] == "gs://bucket/weights/model-790000.ckpt"
  assert _ema("gs://bucket/converted")["step"] == record["step"]
  assert os.listdir(tmp_path) == []


def test_folder_source_lists_and_decodes_images_in_the_bucket(gcs):
  rng = np.random.default_rng(0)
  pictures = {
    "b/two.png": rng.integers(0, 256, (5, 6, 3), np.uint8),
    "a.png": rng.integers(0, 256, (4, 4, 3), np.uint8),
  }
  for name, pixels in pictures.items():
    images.save_png(pixels, f"gs://bucket/images/{name}")
  files.write_bytes("gs://bucket/images/notes.txt", b"not an image")
  source = sources.make_source(sources.DataConfig(source="folder", path="gs://bucket/images"))
  assert source.files == ["a.png", "b/two.png"]
  for index, name in enumerate(source.files):
    np.testing.assert_array_equal(source[index]["image"], pictures[name])


def test_lines_appended_to_an_object_in_the_bucket_are_kept(gcs):
  """An object store cannot append: `files.append_line` rewrites the object, keeping its lines."""
  path = "gs://bucket/logs/history.jsonl"
  for line in ("first", "second"):
    files.append_line(path, line)
  assert files.read_text(path) == "first\nsecond\n"


def test_launch_segment_reads_a_run_and_images_in_the_bucket_and_writes_masks_there(
  gcs, tmp_path, monkeypatch
):
  """A segmentation run trained on the bucket (smoke, 2 steps, in this process) segments a
  folder of images in the bucket into it: DIR/NAME.png at each image's size, and a panel."""
  monkeypatch.chdir(tmp_path)
  config = segmentation_cells.get_config("smoke")
  config.train.num_steps = 2
  loop.train_and_evaluate(config, "gs://bucket/cells")
  cells = synthetic.make_cells(0, "test", 0, size=64).image[..., 0]  # uint8 [64, 64]
  sizes = {"square": (64, 64), "scans/wide": (40, 56)}
  for name, (height, width) in sizes.items():
    images.save_png(cells[:height, :width], f"gs://bucket/cell_images/{name}.png")
  output = "gs://bucket/cell_masks"
  log = _succeeded(
    _launch(
      tmp_path,
      "-m",
      "launch.segment",
      "--workdir=gs://bucket/cells",
      "--input=gs://bucket/cell_images",
      f"--output={output}",
    )
  )
  for name, size in sizes.items():
    mask = _png(files.join(output, f"{name}.png"))
    assert mask.shape == size and set(np.unique(mask)) <= {0, 1}, (name, log)
    assert _png(files.join(output, f"{name}_panel.png")).shape[0] == size[0]
  assert os.listdir(tmp_path) == []


def test_a_new_run_in_the_bucket_has_no_checkpoint_to_restore(gcs):
  """An object store has no empty folders: before the first save, checkpoints/ does not exist."""
  checkpointer = checkpoint.Checkpointer("gs://bucket/new_run", every_steps=1, keep=1)
  try:
    assert checkpointer.restore_fields({}) is None
  finally:
    checkpointer.close()


@pytest.mark.parametrize("module", ["launch.train", "launch.sample"])
def test_a_missing_bucket_is_one_line_naming_the_path(gcs, tmp_path, module):
  flags = [CONFIG] if module == "launch.train" else []
  result = _launch(tmp_path, "-m", module, *flags, "--workdir=gs://no-such-bucket/run")
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert last.startswith(f"{module}: ") and "gs://no-such-bucket/run" in last
  assert os.listdir(tmp_path) == []


def test_denied_access_is_one_line_naming_the_path(gcs, tmp_path):
  with gcs_emulator.forbidding_server() as url:
    result = _launch(
      tmp_path,
      "-m",
      "launch.sample",
      "--workdir=gs://bucket/run",
      env=gcs_emulator.environment(url),
    )
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert last.startswith("launch.sample: gs://bucket/run/config.json: access denied"), last
  assert os.listdir(tmp_path) == []


def test_a_training_write_denied_by_the_bucket_is_one_line_naming_the_path(tmp_path):
  """Credentials that may read an empty bucket but not write it: the first write of the run."""
  with gcs_emulator.forbidding_server(read_only=True) as url:
    result = _launch(
      tmp_path,
      "-m",
      "launch.train",
      CONFIG,
      "--workdir=gs://bucket/run",
      env=gcs_emulator.environment(url),
    )
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert last.startswith(
    "launch.train: Cannot write in workdir gs://bucket/run:"
    " gs://bucket/run/.write_check_0: access denied"
  ), last
  assert os.listdir(tmp_path) == []
