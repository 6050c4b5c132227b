"""Evaluation as one multi-process job, and the exact merging of feature statistics.

The multi-process run is launch.evaluate as 2 processes x 2 fake CPU devices
(gloo collectives); the reference is the same launcher as 1 process x 4
devices. tests/evaluation_numbers.py says what each number may differ by, and why.
"""

import functools
import json
import os
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import data, files, parallel
from diffusion_jax.evaluation import features as feature_lib
from diffusion_jax.evaluation import hosts, metrics, nll
from diffusion_jax.config.evaluation import NllConfig
from diffusion_jax.runs import load_ema_for_sampling

import local_jobs  # tests/local_jobs.py
from evaluation_numbers import REL_TOLERANCE, STATS_TOLERANCE, assert_same_numbers

# NLL on the first 12 test digits in global batches of 8: on 1 process batch 0 holds
# examples 0..7; on 2 processes it holds 0..3 and 6..9 (each process reads 6).
# nll_ode (the adaptive solver, loose tolerances) on the first 8 in one global batch of 8:
# each process of 2 reads 4, so the batch is the same in both layouts, and so is the error
# norm over all of it that sets every step.
EVAL_FLAGS = [
  "--config=configs/eval/digits.py:smoke",
  "--config.nll.num_examples=12",
  "--config.metrics=fd_digits,is_digits,nll,nll_ode",
  "--config.nll_ode.num_examples=8",
  "--config.nll_ode.batch_size=8",
  "--config.nll_ode.rtol=1e-3",
  "--config.nll_ode.atol=1e-3",
]
# Process 0 writes with umask 022, every other process with 077: a file or folder
# that any other process made is unreadable to the group.
_LAUNCH_WITH_UMASKS = (
  "import os, runpy, sys; sys.path.insert(0, '.');"
  " os.umask(0o022 if os.environ['JAX_PROCESS_ID'] == '0' else 0o077);"
  " runpy.run_module('launch.evaluate', run_name='__main__', alter_sys=True)"
)


def _evaluate_job(run_dir: str, workdir: str, num_processes: int, devices_per_process: int):
  """(report, the eval folder, the processes' logs) of launch.evaluate on a copy of run_dir."""
  shutil.copytree(run_dir, workdir, ignore=shutil.ignore_patterns("eval"))
  logs = local_jobs.run_job(
    ["-c", _LAUNCH_WITH_UMASKS, f"--workdir={workdir}", *EVAL_FLAGS],
    num_processes,
    devices_per_process,
  )
  eval_dir = os.path.join(workdir, "eval")
  with open(os.path.join(eval_dir, "digits-step4", "report.json")) as f:
    return json.load(f), eval_dir, logs


@pytest.fixture(scope="module")
def reports(digits_smoke_run, tmp_path_factory):
  """{process count: (report, eval folder, logs)} for 1 x 4 and 2 x 2 devices."""
  root = tmp_path_factory.mktemp("evaluate_hosts")
  return {
    count: _evaluate_job(digits_smoke_run, str(root / f"run{count}"), count, 4 // count)
    for count in (1, 2)
  }


@pytest.mark.gloo
def test_two_processes_report_the_numbers_of_one(reports):
  (one, _, _), (two, _, logs) = reports[1], reports[2]
  assert "Process 1 of 2, 2 local / 4 global devices" in logs[1]
  assert_same_numbers(two, one)
  assert two["nll"]["num_examples"] == 12
  assert two["runs"][0]["num_samples"] == 20 and two["real_floor"]["num_images"] == 300
  for name, reference in two["references"].items():
    assert reference["num_images"] == one["references"][name]["num_images"] == 1497


@pytest.mark.gloo
def test_two_processes_take_the_nll_ode_steps_of_one(reports):
  """nll_ode's adaptive solver on 2 processes x 2 devices: the steps and values of 1 x 4."""
  one, two = reports[1][0]["nll_ode"], reports[2][0]["nll_ode"]
  assert one["solver"] == "dopri5" and two["num_examples"] == one["num_examples"] == 8
  for name in ("nfe", "accepted", "rejected"):
    assert two[name] == one[name], name
  assert one["accepted"] > 1  # a real solve, its step size controlled
  assert two["bpd"] == pytest.approx(one["bpd"], rel=REL_TOLERANCE)


@pytest.mark.gloo
def test_two_processes_merge_the_reference_statistics_of_one(reports):
  """The 1,497 training digits' mean and covariance, as each run cached them."""
  (one, _, _), (two, _, _) = reports[1], reports[2]
  cached = [
    files.load_npz(report["references"]["digits_classifier"]["path"]) for report in (one, two)
  ]
  for key in ("mu", "sigma"):
    scale = np.abs(cached[0][key]).max()
    np.testing.assert_allclose(cached[1][key], cached[0][key], rtol=0, atol=STATS_TOLERANCE * scale)


@pytest.mark.gloo
def test_only_process_0_writes_and_paths_are_recorded_as_given(reports):
  for count, (report, eval_dir, _) in reports.items():
    assert report["workdir"] == os.path.dirname(eval_dir)  # as given on the command line
    written = sorted(
      os.path.relpath(os.path.join(folder, name), eval_dir)
      for folder, dirs, names in os.walk(eval_dir)
      for name in dirs + names
    )
    private = [
      name for name in written if not os.stat(os.path.join(eval_dir, name)).st_mode & stat.S_IRGRP
    ]
    assert not private, f"made by a process other than 0 ({count} processes): {private}"
    assert "digits-step4/report.json" in written
  names = [
    sorted(n for n in _tree(eval_dir) if "tfevents" not in n) for _, eval_dir, _ in reports.values()
  ]
  assert names[0] == names[1]  # the same files: samples, NLL batches, reference, report


def _tree(root: str) -> list[str]:
  return [
    os.path.relpath(os.path.join(folder, name), root)
    for folder, _, names in os.walk(root)
    for name in names
  ]


# ----------------------------------------------------------------------------- merging


def _toy_features(images):
  """A feature 'network' of 8x8x1 uint8 images: pool = 5 nonlinear features, logits = 3."""
  x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
  pool = jnp.stack(
    [x[:, :8].mean(1), x[:, 8:].max(1), jnp.sin(x[:, 3] * 3.0), x[:, 10] * x[:, 20], x[:, 63]],
    axis=1,
  )
  return {"pool": pool, "logits": pool[:, :3] * 4.0}


def _toy_net(mesh) -> feature_lib.FeatureNet:
  batch = parallel.batch_sharding(mesh)
  features = jax.jit(_toy_features, in_shardings=batch, out_shardings=batch)
  return feature_lib.FeatureNet("toy", features, mesh, 16, 5, None, {}, flops=lambda images: 0.0)


def test_statistics_of_sharded_batches_equal_those_of_the_whole_set():
  """37 images in batches of 16 over 8 devices (the last padded): numpy's mean and cov of all."""
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  net = _toy_net(mesh)
  images = np.random.default_rng(0).integers(0, 256, (37, 8, 8, 1), np.uint8)
  summary = feature_lib.summarize(
    net, feature_lib.local_batches(images, 16), keep_logits=True, keep_pool=True
  )
  expected = jax.device_get(jax.jit(_toy_features)(images))
  mu, sigma = summary.pool.statistics()
  np.testing.assert_allclose(mu, expected["pool"].astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(
    sigma, np.cov(expected["pool"].astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-15
  )
  assert summary.count == 37
  np.testing.assert_array_equal(summary.logits, expected["logits"])  # in the images' order
  np.testing.assert_array_equal(summary.pool_features, expected["pool"])


def test_merged_parts_equal_the_whole_and_travel_bit_for_bit():
  """Accumulators of unequal parts, merged in order: numpy's statistics of the concatenation."""
  rng = np.random.default_rng(1)
  parts = [rng.normal(3.0, 2.0, (n, 6)) for n in (1, 17, 40, 2)]
  accumulators = [metrics.GaussianAccumulator(6).update(p) for p in parts]
  moments = [
    metrics.GaussianAccumulator.from_moments(a.count, a.mean, a.scatter) for a in accumulators
  ]
  merged = functools.reduce(metrics.GaussianAccumulator.merge, moments)
  whole = np.concatenate(parts)
  mu, sigma = merged.statistics()
  np.testing.assert_allclose(mu, whole.mean(0), rtol=1e-13)
  np.testing.assert_allclose(sigma, np.cov(whole, rowvar=False), rtol=1e-12)
  # One process: the exchange returns its own statistics exactly, not rounded to float32.
  exchanged = hosts.merge_over_processes(merged)
  assert exchanged.count == merged.count == 60
  np.testing.assert_array_equal(exchanged.mean, merged.mean)
  np.testing.assert_array_equal(exchanged.scatter, merged.scatter)
  assert not np.array_equal(merged.mean.astype(np.float32).astype(np.float64), merged.mean)


def _rows_of_process(process: int) -> np.ndarray:
  """Process p's float64 features: 5 + 3p rows of 4, far from any float32 value."""
  return np.random.default_rng(process).normal(1 / 3, 1e3, (5 + 3 * process, 4))


def exchange_worker(out_dir: str) -> None:
  """One process of a 2-process job: merges its statistics and gathers its rows with the other's."""
  parallel.maybe_initialize_distributed()
  process = jax.process_index()
  rows = _rows_of_process(process)
  merged = hosts.merge_over_processes(metrics.GaussianAccumulator(4).update(rows))
  index = np.full(8, -1)  # process p holds the set's rows p, p + 2, p + 4, p + 6, then padding
  index[:4] = np.arange(process, 8, 2)
  ordered = hosts.gather_in_order(index[:, None] * 10.0, index)
  np.savez(
    os.path.join(out_dir, f"process_{process}.npz"),
    count=merged.count,
    mean=merged.mean,
    scatter=merged.scatter,
    ordered=ordered,
  )


@pytest.mark.gloo
def test_two_processes_merge_float64_statistics_bit_for_bit(tmp_path):
  """Both processes hold the in-order merge of both parts, every float64 bit of it."""
  local_jobs.run_job(
    [
      "-c",
      "import sys; sys.path[:0] = ['tests', '.']; import test_evaluate_hosts;"
      " test_evaluate_hosts.exchange_worker(*sys.argv[1:])",
      str(tmp_path),
    ],
    devices_per_process=1,
  )
  parts = [metrics.GaussianAccumulator(4).update(_rows_of_process(p)) for p in (0, 1)]
  expected = functools.reduce(
    metrics.GaussianAccumulator.merge,
    [metrics.GaussianAccumulator.from_moments(a.count, a.mean, a.scatter) for a in parts],
  )
  for process in (0, 1):
    result = np.load(tmp_path / f"process_{process}.npz")
    assert result["count"] == 13
    np.testing.assert_array_equal(result["mean"], expected.mean)
    np.testing.assert_array_equal(result["scatter"], expected.scatter)
    np.testing.assert_array_equal(result["ordered"][:, 0], np.arange(8) * 10.0)  # set order
  assert not np.array_equal(expected.mean.astype(np.float32).astype(np.float64), expected.mean)


def test_local_batches_cover_every_image_once_in_equal_batches():
  images = np.arange(37, dtype=np.uint8).reshape(37, 1, 1, 1)
  batches = list(feature_lib.local_batches(images, 16))
  assert [len(b["image"]) for b in batches] == [16, 16, 16]
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(index[index >= 0], np.arange(37))
  for batch in batches:
    np.testing.assert_array_equal(batch["mask"], batch["index"] >= 0)
    np.testing.assert_array_equal(
      batch["image"][batch["mask"], 0, 0, 0], batch["index"][batch["mask"]]
    )


# ----------------------------------------------------------------------------- NLL


def test_nll_of_an_example_does_not_depend_on_its_batch(digits_smoke_run, tmp_path):
  """Batches of 8, then of 16, in one folder: the same numbers; the stale batch 0 is recomputed."""
  model = load_ema_for_sampling(digits_smoke_run)
  split = data.DataConfig(
    source="digits", split="test", image_size=8, num_channels=1, num_threads=0
  )
  config = NllConfig(num_examples=12)
  out_dir = str(tmp_path / "nll")
  results = {}
  for batch_size in (8, 16):
    batches = data.make_eval_iterator(split, batch_size, num_examples=12)
    results[batch_size] = nll.evaluate_nll(model, batches, config, out_dir, key=jax.random.key(0))
  for part in nll.PARTS:
    assert results[16][part] == pytest.approx(results[8][part], rel=REL_TOLERANCE), part
  assert results[16]["num_examples"] == results[8]["num_examples"] == 12
  index = files.load_npz(os.path.join(out_dir, "batch_000000.npz"))["index"]
  np.testing.assert_array_equal(np.sort(index[index >= 0]), np.arange(12))  # not 0..7 of run 1
