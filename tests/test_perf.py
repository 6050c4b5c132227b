"""Speed you can see (diffusion_jax/perf.py): FLOPs against a hand count, peaks, the loop's log."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator

from configs import digits
from diffusion_jax import data, parallel, perf, runs, sampling
from diffusion_jax.config.evaluation import EvalConfig
from diffusion_jax.config.train import TrainConfig
from diffusion_jax.evaluation import features
from diffusion_jax.train import loop, tasks

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH = 64  # over the 8 fake devices of tests/conftest.py: 8 images each
SIDE, CHANNELS, WIDTH = 8, 1, 64  # the digits' 8x8x1 images; the network's width


class ThreeConvs(nn.Module):
  """eps(x_t) = conv(relu(conv(relu(conv(x_t))))), 3x3 "SAME" convolutions 1 -> 64 -> 64 -> 1."""

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    del t, y, train
    h = nn.relu(nn.Conv(WIDTH, (3, 3))(x))
    h = nn.relu(nn.Conv(WIDTH, (3, 3))(h))
    return nn.Conv(CHANNELS, (3, 3))(h)


def _hand_count(images: int) -> int:
  """Multiply-adds of the three convolutions' forward and backward passes, times 2.

  A 3x3 "SAME" convolution of a side-8 image reads 8 * 3 - 2 = 22 in-image
  taps per axis (the zero padding is not computed): 22^2 pixel pairs, each
  C_in * C_out multiply-adds. The backward pass takes each layer's kernel
  gradient (as many again) and its input gradient (as many again) except the
  first layer's, whose input x_t no parameter depends on.
  """
  pairs = images * (SIDE * 3 - 2) ** 2
  layers = [(CHANNELS, WIDTH, 2), (WIDTH, WIDTH, 3), (WIDTH, CHANNELS, 3)]  # (in, out, passes)
  return sum(2 * pairs * c_in * c_out * passes for c_in, c_out, passes in layers)


def _step_flops(model: nn.Module | None, remat: bool = False, **train):
  """(the compiled step's own per-device FLOPs, the loop's model FLOPs per device).

  `model` None: the digits smoke U-Net, rematerialised if `remat`.
  """
  config = digits.get_config("smoke")
  config.model.remat = remat
  config.train.update(batch_size=BATCH, **train)
  exp = tasks.build(config, model)
  mesh = parallel.make_mesh()
  state, shardings = loop.create_state(exp, mesh, seed=0)
  batch = data.make_global_batch(next(exp.make_train_iterator()), parallel.batch_sharding(mesh))
  compiled = loop.compile_train_step(exp, shardings, mesh).lower(state, batch).compile()
  return perf.compiled_flops(compiled), loop.step_flops(exp, compiled, state, batch, mesh)


@pytest.fixture(scope="module")
def one_microbatch():
  return _step_flops(ThreeConvs())


def test_a_step_counts_its_convolutions(one_microbatch):
  """Per device (8 of the 64 images): the hand count, and under 3% more for the rest of the step

  (the elementwise work; the gradient norm, Adam, the EMA and the finiteness check per parameter).
  """
  own, counted = one_microbatch
  hand = _hand_count(BATCH // jax.device_count())
  assert own == counted
  assert hand <= counted <= 1.03 * hand


def test_gradient_accumulation_counts_every_microbatch(one_microbatch):
  """XLA counts a scan's body once: 4 microbatches are counted as the one-pass step."""
  own, counted = _step_flops(ThreeConvs(), grad_accum_steps=4)
  assert own < 0.5 * one_microbatch[0]  # what the loop must not log
  assert counted == pytest.approx(one_microbatch[1], rel=0.02)


def test_remat_is_not_model_work():
  """A rematerialising U-Net recomputes forward passes; its model FLOPs are those without."""
  plain, _ = _step_flops(None)
  remat_own, remat_counted = _step_flops(None, remat=True)
  assert remat_own > 1.1 * plain
  assert remat_counted == pytest.approx(plain, rel=0.02)


@pytest.mark.parametrize(
  "kind, dtype, name, peak",
  [
    ("NVIDIA H100 80GB HBM3", jnp.bfloat16, "H100", 989.4e12),
    ("NVIDIA H100 PCIe", jnp.float32, "H100 PCIe", 378e12),
    ("NVIDIA H200", jnp.bfloat16, "H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", jnp.float32, "A100", 156e12),
    ("TPU v4", jnp.float32, "TPU v4", 275e12),
    ("TPU v5 lite", jnp.bfloat16, "TPU v5e", 197e12),
    ("TPU v5p", jnp.bfloat16, "TPU v5p", 459e12),
    ("TPU v6 lite", jnp.bfloat16, "TPU v6e", 918e12),
    ("cpu", jnp.float32, None, None),
  ],
)
def test_peak_flops_by_device_kind(kind, dtype, name, peak):
  assert perf.device_peak_name(kind) == name
  assert perf.peak_flops(kind, dtype) == peak


def test_rates():
  values = perf.rates(steps=10, seconds=4.0, flops_per_step=2e12, batch_size=128, peak=10e12)
  assert values == pytest.approx(
    {"steps_per_sec": 2.5, "images_per_sec": 320.0, "tflops_per_device": 5.0, "mfu": 0.5}
  )
  assert "mfu" not in perf.rates(10, 4.0, 2e12, 128, peak=None)


def test_the_training_log_shows_throughput(digits_smoke_run):
  """Each log step writes perf/* scalars: steps/s, images/s, TFLOP/s per device (no MFU on CPU)."""
  scalars = plugin_event_accumulator.EventAccumulator(digits_smoke_run).Reload()
  tags = scalars.Tags()["tensors"]
  for tag in ("perf/steps_per_sec", "perf/images_per_sec", "perf/tflops_per_device"):
    assert [event.step for event in scalars.Tensors(tag)] == [2, 4]
  assert "perf/mfu" not in tags


def test_sampling_logs_images_per_second(digits_smoke_run, tmp_path, caplog):
  """launch.sample's draw_samples logs its rate; its FLOPs are one network call per step."""
  model = runs.load_ema_for_sampling(digits_smoke_run)
  with caplog.at_level(logging.INFO):
    runs.draw_samples(model, sampling.SamplerConfig("ddim", 2), 16, 8, str(tmp_path), seed=0)
  assert "Sampled 2 batches:" in caplog.text and "images/s" in caplog.text
  assert runs.forward_flops(model, 16, 8) == pytest.approx(
    2 * runs.forward_flops(model, 8, 8), rel=1e-3
  )


def test_feature_extraction_logs_images_per_second(caplog):
  """Evaluation's features log their rate after the first batch (whose time holds the compile);
  FLOPs are the network's on the global batch, per device."""
  net = features.load_digits_net(
    EvalConfig(name="rate", metrics=("fd_digits",), feature_batch_size=16)
  )
  images = np.random.default_rng(0).integers(0, 256, (48, 8, 8, 1), np.uint8)
  with caplog.at_level(logging.INFO):
    features.summarize(net, features.local_batches(images, 16), desc="digits features")
  (line,) = [
    r.getMessage() for r in caplog.records if r.getMessage().startswith("digits features:")
  ]
  assert "images/s" in line and "MFU unknown" in line and "the 2 batches after the first" in line
  batch = lambda size: jax.ShapeDtypeStruct((size, 8, 8, 1), jnp.uint8)
  assert net.flops(batch(16)) > 0
  assert net.flops(batch(16)) == pytest.approx(2 * net.flops(batch(8)), rel=1e-3)


def test_profile_steps_write_a_trace(tmp_path):
  """train.profile_steps="2" traces step 2 into WORKDIR/profile/ (a 2-step run)."""
  config = digits.get_config("smoke")
  config.train.update(num_steps=2, profile_steps="2")
  loop.train_and_evaluate(config, str(tmp_path))
  profile = tmp_path / loop.PROFILE_DIR
  for pattern in ("*.xplane.pb", "perfetto_trace.json.gz"):  # TensorBoard's, Perfetto's
    (trace,) = profile.rglob(pattern)
    assert trace.stat().st_size > 0


@pytest.mark.parametrize("text", ["2,1", "0", "a,b", "1,2,3"])
def test_bad_profile_steps_are_named(text):
  with pytest.raises(ValueError, match="train.profile_steps"):
    TrainConfig(profile_steps=text)


def test_accelerator_benchmark_tiny_writes_every_row(tmp_path):
  """benchmarks/accelerator.py --tiny on one CPU device: every row measured, MFU against a probe.

  The probe's FLOP/s are a shared CPU's at one moment, not a peak: a busy
  machine put the tiny Inception at 297% of it, so MFU is only checked positive.
  """
  out = tmp_path / "accelerator.json"
  one_device = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # compiles less
  result = subprocess.run(
    [sys.executable, "-m", "benchmarks.accelerator", "--tiny", f"--out={out}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
    env=one_device,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  rows = json.loads(out.read_text())["rows"]
  measured = [row for row in rows if row["kind"] != "largest_batch"]
  assert [(row["kind"], row["dtype"]) for row in measured] == [
    ("train", "float32"),
    ("train", "bfloat16"),
    ("train", "bfloat16"),
    ("sample", "bfloat16"),
    ("sample", "bfloat16"),
    ("sample", "bfloat16"),
    ("inception", "float32"),
  ]
  for row in measured:
    assert f"{row['kind']} {row['name']}" in result.stdout  # its line of the table
    assert row["images_per_sec"] > 0 and row["tflops_per_device"] > 0 and row["compile_s"] > 0
    assert row["peak_source"] == "matmul probe" and 0 < row["mfu"] < float("inf")
  for row in measured[:3] + measured[-1:]:  # XLA's memory of the compiled program
    assert row["memory_gib"] > 0
  searches = [row for row in rows if row["kind"] == "largest_batch"]
  assert [row["remat"] for row in searches] == [False, True]
  for row in searches:  # --tiny's one compile each: batch 8 fits 64 MiB
    assert row["finished"] and row["largest_batch"] == 8
    assert 0 < row["tried_gib"]["8"] <= row["limit_gib"]
  assert "largest ddpm_cifar10 bfloat16 train batch with remat" in result.stdout


@pytest.mark.parametrize(
  "limit, start, granule, found",
  [
    (100, 8, 8, 96),  # doubles to 64, bisects 64..128 to within an eighth
    (20, 128, 4, 20),  # the first guess too large: starts again from one granule
    (3, 8, 4, 0),  # nothing fits
    (10**6, 8, 8, 512),  # max_batch fits: the search ends there
  ],
)
def test_largest_batch_search(limit, start, granule, found):
  tried = []
  fits = lambda batch: tried.append(batch) or batch <= limit
  assert perf.largest_batch(fits, start, granule, deadline=float("inf"), max_batch=512) == (
    found,
    True,
  )
  assert all(batch % granule == 0 for batch in tried)
  assert perf.largest_batch(fits, start, granule, deadline=0.0) == (0, False)  # out of time
