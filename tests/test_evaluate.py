"""launch.evaluate end to end on a smoke run: the report, resuming, NLL, and one clear error per bad input."""

import hashlib
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.eval import digits as digits_eval
from diffusion_jax import evaluation
from diffusion_jax.config.evaluation import METRIC_NETWORKS
from diffusion_jax.data import sources
from diffusion_jax.evaluation import digits_classifier, features, inception, nll, scores

from evaluation_numbers import (  # tests/evaluation_numbers.py
  assert_scores_are,
  digits_scores,
  frechet_distance,
  inception_score,
  precision_recall,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _evaluate_subprocess(*flags: str, timeout: int = 600):
  return subprocess.run(
    [sys.executable, "-m", "launch.evaluate", *flags],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _config(**overrides) -> evaluation.EvalConfig:
  config = digits_eval.get_config("smoke")
  config.update(overrides)
  return evaluation.from_config_dict(config)


@pytest.fixture(scope="module")
def smoke_report(digits_smoke_run):
  """launch.evaluate of configs/eval/digits.py:smoke on the smoke run, in a subprocess."""
  result = _evaluate_subprocess(
    "--config=configs/eval/digits.py:smoke", f"--workdir={digits_smoke_run}"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out_dir = os.path.join(digits_smoke_run, "eval", "digits-step4")
  with open(os.path.join(out_dir, "report.json")) as f:
    return json.load(f), out_dir, result.stdout


def test_report_holds_every_metric_the_config_names(smoke_report):
  """fd_digits and is_digits of the saved samples and of the real floor are the formulas on
  their classifier features (tests/evaluation_numbers.py); the NLL adds up; the table is shown."""
  report, out_dir, stdout = smoke_report
  assert report["checkpoint_step"] == 4
  (run_report,) = report["runs"]
  assert run_report | {"sampler": "ddim", "steps": 3, "nfe": 3, "num_samples": 20} == run_report
  config = _config()
  (samples_dir,) = [d for d in os.listdir(out_dir) if d.startswith("samples-")]
  with np.load(os.path.join(out_dir, samples_dir, "samples.npz")) as saved:
    samples = saved["arr_0"]
  assert samples.shape == (20, 8, 8, 1)
  train_digits = sources.digits_source(config.reference_split).images
  real = sources.digits_source(config.nll.split).images
  assert_scores_are(
    ("samples", run_report, digits_scores(samples, train_digits, config.is_splits)),
    ("real_floor", report["real_floor"], digits_scores(real, train_digits, config.is_splits)),
  )
  # 4 training steps make noise: far from the held-out digits, which score near 10 classes.
  assert run_report["fd_digits"] > 5 * report["real_floor"]["fd_digits"]
  assert report["real_floor"]["is_digits"] > 8 > run_report["is_digits"]
  assert report["real_floor"]["num_images"] == 300
  parts = report["nll"]
  assert parts["num_examples"] == 8 and parts["clip_x0"] is True
  assert parts["bpd"] == pytest.approx(
    parts["prior_bpd"] + parts["decoder_bpd"] + parts["terms_bpd"], rel=1e-5
  )
  assert 0 < parts["bpd"] < 16 and parts["decoder_bpd"] > 0
  assert set(report["seconds"]) >= {"load", "reference", "sampling", "features", "nll"}
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(out_dir))
  assert "fd_digits" in stdout and "bits/dim" in stdout  # the table


def test_rerun_resumes_from_finished_batches(smoke_report, digits_smoke_run):
  """An interrupted evaluation (report, a sample batch and the NLL batch gone) resumes to the same report."""
  report, out_dir, _ = smoke_report
  samples_dir = next(
    os.path.join(out_dir, d) for d in os.listdir(out_dir) if d.startswith("samples-")
  )
  kept = os.path.join(samples_dir, "batch_000000.npz")
  kept_mtime = os.stat(kept).st_mtime_ns
  os.remove(os.path.join(samples_dir, "batch_000002.npz"))
  os.remove(os.path.join(out_dir, "report.json"))
  rerun = evaluation.evaluate(_config(), digits_smoke_run)
  assert os.stat(kept).st_mtime_ns == kept_mtime  # reused, not redrawn
  for key in ("fd_digits", "is_digits"):
    assert rerun["runs"][0][key] == pytest.approx(report["runs"][0][key], rel=1e-6)
  assert rerun["nll"]["bpd"] == pytest.approx(report["nll"]["bpd"], rel=1e-6)


def test_nll_with_and_without_clipping(digits_smoke_run, tmp_path):
  from diffusion_jax import data  # pylint: disable=g-import-not-at-top
  from diffusion_jax.runs import load_ema_for_sampling  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  model = load_ema_for_sampling(digits_smoke_run)
  data_config = data.DataConfig(
    source="digits", split="test", image_size=8, num_channels=1, num_threads=0
  )
  results = {}
  for clip in (True, False):
    config = evaluation.NllConfig(num_examples=5, batch_size=8, clip_x0=clip)
    batches = data.make_eval_iterator(data_config, 8, num_examples=config.num_examples)
    results[clip] = nll.evaluate_nll(
      model, batches, config, str(tmp_path / f"clip{clip}"), key=jax.random.key(0)
    )
  for result in results.values():
    assert result["num_examples"] == 5 and np.isfinite(result["bpd"])
  # The untrained model's x_0 estimates leave [-1, 1]: clipping them changes the bound.
  assert results[True]["terms_bpd"] != pytest.approx(results[False]["terms_bpd"], rel=1e-3)
  assert results[True]["prior_bpd"] == pytest.approx(results[False]["prior_bpd"])


def test_sweep_writes_fd_vs_nfe_figure(digits_smoke_run):
  """NFE is the true number of network calls: EDM's Heun makes 2N - 1 for N steps; settings
  that differ only in their churn are separate runs (own samples, own line)."""
  config = _config(
    name="sweep",
    samplers=[
      dict(sampler="ddim", steps=2),
      dict(sampler="ddim", steps=4),
      dict(sampler="edm_heun", steps=2),
      dict(sampler="edm_heun", steps=2, s_churn=1.0),
    ],
    metrics=("fd_digits",),
    real_floor=False,
  )
  report = evaluation.evaluate(config, digits_smoke_run)
  assert [r["nfe"] for r in report["runs"]] == [2, 4, 3, 3]
  assert [r["options"] for r in report["runs"]] == ["", "", "", "s_churn=1"]
  assert report["runs"][2]["fd_digits"] != report["runs"][3]["fd_digits"]
  assert os.path.exists(os.path.join(digits_smoke_run, "eval", "sweep-step4", "fid_vs_nfe.png"))


def test_several_seeds_report_each_draw_and_their_min_and_mean(digits_smoke_run, capsys):
  """EDM's protocol: each setting drawn once per seed; a seed's draw is the draw of a run with
  that one seed."""
  samplers = [dict(sampler="ddim", steps=2), dict(sampler="ddim", steps=3)]
  config = _config(
    name="seeds", samplers=samplers, seeds=(0, 1, 2), metrics=("fd_digits",), real_floor=False
  )
  report = evaluation.evaluate(config, digits_smoke_run)
  assert [(r["steps"], r["seed"]) for r in report["runs"]] == [
    (2, 0),
    (2, 1),
    (2, 2),
    (3, 0),
    (3, 1),
    (3, 2),
  ]
  alone = evaluation.evaluate(
    _config(name="seed1", samplers=samplers[:1], seed=1, metrics=("fd_digits",), real_floor=False),
    digits_smoke_run,
  )
  assert alone["runs"][0]["fd_digits"] == report["runs"][1]["fd_digits"]
  assert "over_seeds" not in alone
  for summary, runs in zip(report["over_seeds"], (report["runs"][:3], report["runs"][3:])):
    fds = [run["fd_digits"] for run in runs]
    assert len(set(fds)) == 3  # three different draws
    assert summary["seeds"] == [0, 1, 2] and summary["steps"] == runs[0]["steps"]
    assert summary["min"]["fd_digits"] == min(fds)
    assert summary["mean"]["fd_digits"] == pytest.approx(np.mean(fds), rel=1e-12)
  assert "ddim-2steps min over seeds [0, 1, 2]" in capsys.readouterr().out
  assert os.path.exists(os.path.join(digits_smoke_run, "eval", "seeds-step4", "fid_vs_nfe.png"))


def test_samples_file_is_evaluated_instead_of_the_run(tmp_path):
  """Real held-out digits as a 'samples file': scored as the formulas say, the same as the real
  floor, no run needed."""
  samples = sources.digits_source("test").images
  path = tmp_path / "real.npz"
  np.savez(path, arr_0=samples)
  config = _config(metrics=("fd_digits", "is_digits", "nll"), real_floor=True)
  report = evaluation.evaluate(config, str(tmp_path / "no_run"), samples_path=str(path))
  (scores,) = report["runs"]
  expected = digits_scores(
    samples, sources.digits_source(config.reference_split).images, config.is_splits
  )
  assert_scores_are(
    ("samples file", scores, expected), ("real_floor", report["real_floor"], expected)
  )
  assert report["skipped"] == {"nll": f"no training run in {tmp_path / 'no_run'}"}
  assert os.path.exists(tmp_path / "no_run" / "eval" / "digits-real" / "report.json")


def test_digits_classifier_is_accurate_on_held_out_digits():
  test = sources.digits_source("test")
  logits = digits_classifier.digits_features(digits_classifier.load_or_train(), test.images)[
    "logits"
  ]
  assert np.mean(logits.argmax(1) == test.labels) > 0.9  # measured 0.99; chance is 0.1


# ----------------------------------------------------------------------------- bad input


def _assert_nothing_written(workdir):
  assert not os.path.exists(os.path.join(workdir, "eval"))


def test_missing_inception_weights_is_one_clear_error(digits_smoke_run, monkeypatch):
  monkeypatch.delenv("DIFFUSION_JAX_INCEPTION_WEIGHTS", raising=False)
  workdir = str(digits_smoke_run)
  result = _evaluate_subprocess(
    "--config=configs/eval/digits.py:smoke",
    f"--workdir={workdir}",
    "--config.metrics=fid,nll",
    "--config.name=noweights",
  )
  assert result.returncode == 1
  message = result.stderr.strip().splitlines()[-1]
  assert "inception_weights" in message and "DIFFUSION_JAX_INCEPTION_WEIGHTS" in message
  assert "pt_inception-2015-12-05-6726825d.pth" in message and "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(workdir, "eval", "noweights-step4"))


def test_weights_with_another_hash_are_refused(tmp_path):
  weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  weights.write_bytes(b"not the published weights")
  with pytest.raises(ValueError, match="SHA-256 .* begins with 6726825d"):
    evaluation.evaluate(_config(metrics=("fid",), inception_weights=str(weights)), str(tmp_path))
  _assert_nothing_written(tmp_path)


def test_weights_with_wrong_keys_are_named(tmp_path):
  torch = pytest.importorskip("torch")
  weights = tmp_path / "weights.pth"
  torch.save(
    {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "extra.weight": torch.zeros(2)}, weights
  )
  config = _config(metrics=("fid",), inception_weights=str(weights), inception_sha256_prefix="")
  with pytest.raises(ValueError, match="^[^;]*: unexpected key 'extra.weight'; ") as error:
    evaluation.evaluate(config, str(tmp_path))
  assert "; missing key Conv2d_1a_3x3.bn.running_mean; " in str(error.value)  # then missing ones
  assert str(error.value).endswith(" more")  # the other missing keys, counted
  _assert_nothing_written(tmp_path)


def test_weights_that_run_code_are_refused(tmp_path):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  weights = tmp_path / "weights.pth"
  torch.save({"fc.weight": torch.zeros(2), "payload": Payload()}, weights)
  config = _config(metrics=("fid",), inception_weights=str(weights), inception_sha256_prefix="")
  with pytest.raises(ValueError, match="system"):
    evaluation.evaluate(config, str(tmp_path))
  assert not marker.exists()
  _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
  "array, message",
  [
    (np.zeros((4, 8, 8, 1), np.float32), "must be uint8"),
    (np.zeros((4, 8, 8), np.uint8), "must be uint8 \\[N, H, W, 1 or 3\\]"),
    (np.zeros((4, 16, 16, 1), np.uint8), "need \\(8, 8, 1\\)"),
  ],
)
def test_bad_samples_file_is_named(tmp_path, array, message):
  path = tmp_path / "samples.npz"
  np.savez(path, arr_0=array)
  with pytest.raises(ValueError, match=message) as error:
    evaluation.evaluate(_config(), str(tmp_path), samples_path=str(path))
  assert str(path) in str(error.value)
  _assert_nothing_written(tmp_path)


def test_inception_metrics_of_a_samples_file(tmp_path, random_inception_weights):
  """FID, IS, sFID and precision/recall of 20 images against an ADM-style reference file,
  each equal to its formula on the images' features.

  The samples are noise whose contrast ramps from 0.7 to 1: some lie among the
  reference's noise images, some apart, so precision and recall (0.6 and 5/12)
  are neither 0 nor 1 and change with k (k=2: 0.4, 0.25; k=5: 0.65, 0.5); no point
  lies within 0.9% of a radius of a ball's surface, far beyond float32 round-off.
  """
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
  contrast = np.linspace(0.7, 1, 20)[:, None, None, None]
  samples = np.round(127.5 + (noise - 127.5) * contrast).astype(np.uint8)
  samples_path = tmp_path / "samples.npz"
  np.savez(samples_path, arr_0=samples)
  ref_images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  ref = tmp_path / "ref.npz"
  np.savez(
    ref,
    mu=np.zeros(2048),
    sigma=np.eye(2048),
    mu_s=np.zeros(2023),
    sigma_s=np.eye(2023),
    arr_0=ref_images,
  )
  config = _config(
    metrics=("fid", "is", "sfid", "precision_recall"),
    inception_weights=random_inception_weights,
    inception_sha256_prefix="",
    feature_batch_size=16,  # one compiled batch shape for samples and reference
    real_floor=False,
  )  # the real floor's path is the digits tests' (90 s here)
  report = evaluation.evaluate(
    config, str(tmp_path), samples_path=str(samples_path), reference_path=str(ref)
  )
  (scores,) = report["runs"]
  variables = inception.load_inception(random_inception_weights)
  features = inception.inception_features(variables, samples, batch_size=16)
  ref_pool = inception.inception_features(variables, ref_images, batch_size=16)["pool"]
  expected = {
    "fid": frechet_distance(features["pool"], np.zeros(2048), np.eye(2048)),
    "sfid": frechet_distance(features["spatial"], np.zeros(2023), np.eye(2023)),
  }
  expected["is"], expected["is_std"] = inception_score(features["logits"], config.is_splits)
  expected["precision"], expected["recall"] = precision_recall(ref_pool, features["pool"])
  assert_scores_are(("samples file", scores, expected))
  info = report["feature_networks"]["inception"]
  assert info["sha256"] == hashlib.sha256(open(random_inception_weights, "rb").read()).hexdigest()
  assert info["published_weights"] is False and info["resize"] == "tf"
  assert report["references"]["inception"]["path"] == str(ref)
  assert any("20 < 2048 samples" in warning for warning in report["warnings"])


def test_reference_of_wrong_dimension_is_refused(tmp_path, random_inception_weights):
  """A 64-dim reference for 2048-dim Inception features (random weights, checked keys)."""
  weights = random_inception_weights
  ref = tmp_path / "ref.npz"
  np.savez(ref, mu=np.zeros(64), sigma=np.eye(64))
  samples = tmp_path / "samples.npz"
  np.savez(samples, arr_0=np.zeros((4, 8, 8, 1), np.uint8))
  config = _config(metrics=("fid",), inception_weights=weights, inception_sha256_prefix="")
  with pytest.raises(ValueError, match="64-dim statistics, the features are 2048-dim"):
    evaluation.evaluate(config, str(tmp_path), samples_path=str(samples), reference_path=str(ref))
  _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
  "name, variant",
  [
    ("digits", ""),
    ("digits", "smoke"),
    ("digits", "sweep"),
    ("cifar10_ddpm", None),
    ("cifar10_iddpm", ""),
    ("cifar10_iddpm", "sweep"),
    ("celebahq256_ddpm", None),
    ("imagenet64_iddpm", None),
    ("digits", "edm"),
    ("digits", "nfe"),
    ("cifar10_edm", None),
  ],
)
def test_every_eval_config_is_valid(name, variant):
  module = importlib.import_module(f"configs.eval.{name}")
  config = evaluation.from_config_dict(
    module.get_config() if variant is None else module.get_config(variant)
  )
  assert config.name.startswith(name) and config.metrics and config.data["image_size"] > 0


def test_unknown_metric_is_named():
  with pytest.raises(ValueError, match="Unknown eval metric\\(s\\) \\['fidd'\\]"):
    _config(metrics=("fidd",))


# ----------------------------------------------------------------------------- during training


def _digits_smoke_with_eval(**train_overrides):
  from configs import digits  # pylint: disable=g-import-not-at-top

  config = digits.get_config("smoke")
  config.train.update(
    {"eval_every": 2, "eval_num_samples": 16, "eval_metric": "fd_digits", **train_overrides}
  )
  return config


def _scalars(workdir: str, tag: str) -> dict[int, float]:
  """{step: value} of one scalar in a run's TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  values = {}
  for name in os.listdir(workdir):
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
        for value in event.summary.value:
          if value.tag == tag:
            values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def test_training_logs_a_periodic_evaluation(tmp_path):
  from diffusion_jax.train import loop  # pylint: disable=g-import-not-at-top

  loop.train_and_evaluate(_digits_smoke_with_eval(), str(tmp_path))
  fd = _scalars(str(tmp_path), "eval/fd_digits")
  assert sorted(fd) == [2, 4] and all(np.isfinite(v) and v > 0 for v in fd.values())
  assert any(
    name.startswith("reference-digits_classifier") for name in os.listdir(tmp_path / "eval")
  )  # the cached training-split statistics


def test_periodic_fid_without_weights_fails_before_training(tmp_path, monkeypatch):
  from diffusion_jax.train import loop  # pylint: disable=g-import-not-at-top

  monkeypatch.delenv("DIFFUSION_JAX_INCEPTION_WEIGHTS", raising=False)
  with pytest.raises(FileNotFoundError, match="DIFFUSION_JAX_INCEPTION_WEIGHTS"):
    loop.train_and_evaluate(_digits_smoke_with_eval(eval_metric="fid"), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints" / "2")


def test_the_metric_registry_and_the_names_configs_accept_agree():
  assert list(scores.METRICS) == list(METRIC_NETWORKS)
  assert set(METRIC_NETWORKS.values()) == set(features.LOADERS)
