"""Sampling as one multi-process job (real processes, gloo collectives), and training grids
split over the devices.

The multi-process runs are 2 processes x 2 fake CPU devices; the one-process
reference runs here, on this process's 8 fake devices. The images are compared
bit for bit: every device draws its rows of the same random numbers
(partitionable threefry) and the U-Net's arithmetic per image does not depend on
how many images a device holds, so the uint8 images are equal, not close (on
XLA:CPU; an accelerator may round the last bit differently for a different
per-device batch).
"""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest
from PIL import Image

from configs import digits
from diffusion_jax import parallel, runs, sampling
from diffusion_jax.train import diffusion_task, sample_grids

import local_jobs  # tests/local_jobs.py

NUM_SAMPLES, BATCH_SIZE, SEED = 20, 8, 3  # three batches, the last cut to 4 images
SAMPLER = sampling.SamplerConfig("ddpm", steps=4)
SAMPLE_FLAGS = [
  f"--num_samples={NUM_SAMPLES}",
  f"--batch_size={BATCH_SIZE}",
  f"--seed={SEED}",
  "--sampler=ddpm",
  "--steps=4",
]


def resume_worker(workdir: str, out_dir: str) -> None:
  """One process of the resumed run: draws into out_dir, then tries another seed there.

  Saves what this process's draw_samples returned, and the refusal of the other seed.
  """
  parallel.maybe_initialize_distributed()
  model = runs.load_ema_for_sampling(workdir)
  settings = {"workdir": os.path.abspath(workdir)}  # as launch.sample saves them
  samples = runs.draw_samples(
    model, SAMPLER, NUM_SAMPLES, BATCH_SIZE, out_dir, seed=SEED, settings=settings
  )
  np.save(os.path.join(out_dir, f"returned_{jax.process_index()}.npy"), samples)
  try:
    runs.draw_samples(
      model, SAMPLER, NUM_SAMPLES, BATCH_SIZE, out_dir, seed=SEED + 1, settings=settings
    )
  except ValueError as error:
    with open(os.path.join(out_dir, f"refused_{jax.process_index()}.txt"), "w") as f:
      f.write(str(error))


@pytest.fixture(scope="module")
def one_process_samples(digits_smoke_run, tmp_path_factory) -> np.ndarray:
  model = runs.load_ema_for_sampling(digits_smoke_run)
  return runs.draw_samples(
    model, SAMPLER, NUM_SAMPLES, BATCH_SIZE, str(tmp_path_factory.mktemp("one_process")), seed=SEED
  )


@pytest.fixture(scope="module")
def two_process_run(digits_smoke_run, tmp_path_factory) -> tuple[str, list[str]]:
  """(the output of launch.sample run as 2 processes, their logs)."""
  output = str(tmp_path_factory.mktemp("two_processes") / "samples")
  logs = local_jobs.run_job(
    ["-m", "launch.sample", f"--workdir={digits_smoke_run}", f"--output={output}", *SAMPLE_FLAGS]
  )
  return output, logs


@pytest.mark.gloo
def test_two_processes_draw_the_images_of_one(two_process_run, one_process_samples):
  output, logs = two_process_run
  assert "Process 1 of 2, 2 local / 4 global devices" in logs[1]
  with np.load(os.path.join(output, "samples.npz")) as data:
    samples = data["arr_0"]
  assert samples.shape == (NUM_SAMPLES, 8, 8, 1) and samples.dtype == np.uint8
  assert len({image.tobytes() for image in samples}) == NUM_SAMPLES  # no host repeats another
  np.testing.assert_array_equal(samples, one_process_samples)
  assert sorted(f for f in os.listdir(output) if f.startswith("batch_")) == [
    "batch_000000.npz",
    "batch_000001.npz",
    "batch_000002.npz",
  ]
  assert os.path.exists(os.path.join(output, "grid.png"))
  with open(os.path.join(output, "settings.json")) as f:
    assert json.load(f)["batch_size"] == BATCH_SIZE


@pytest.mark.gloo
def test_two_processes_resume_an_interrupted_run(
  two_process_run, one_process_samples, tmp_path, digits_smoke_run
):
  """Resumes what an interrupted 2-process run leaves: some batches, a killed write's temporary."""
  output = str(tmp_path / "samples")
  shutil.copytree(two_process_run[0], output)
  for name in ("batch_000000.npz", "batch_000002.npz", "samples.npz", "grid.png"):
    os.remove(os.path.join(output, name))
  open(os.path.join(output, ".batch_000000.npz.k1ll3d.npz"), "wb").close()
  kept = os.stat(os.path.join(output, "batch_000001.npz"))

  local_jobs.run_job(
    [
      "-c",
      "import sys; sys.path[:0] = ['tests', '.']; import test_sample_hosts;"
      " test_sample_hosts.resume_worker(*sys.argv[1:])",
      digits_smoke_run,
      output,
    ]
  )
  with np.load(os.path.join(output, "samples.npz")) as data:
    np.testing.assert_array_equal(data["arr_0"], one_process_samples)
  for process in (0, 1):  # batch 1, read by process 0 only, reaches process 1 too
    np.testing.assert_array_equal(
      np.load(os.path.join(output, f"returned_{process}.npy")), one_process_samples
    )
  now = os.stat(os.path.join(output, "batch_000001.npz"))
  assert (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not drawn again
  with open(os.path.join(output, "refused_0.txt")) as f:
    assert "settings of another run" in f.read()
  with open(os.path.join(output, "refused_1.txt")) as f:
    assert f.read().startswith(f"Process 0 refused {output}")


class _ImageWriter:
  """The metric writer's write_images, kept."""

  def write_images(self, step, images):
    self.images = (step, images)


def test_training_grid_is_split_over_devices_and_equal_on_any_count(tmp_path):
  config = digits.get_config("cond,smoke")  # class-conditional: grid labels, padded too
  config.train.num_samples = 10  # on 8 devices: 16 drawn, 10 shown
  exp = diffusion_task.build(config)
  abstract = jax.eval_shape(exp.init_state, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)  # untrained: any weights do
  ema_params = jax.tree.map(
    lambda x: rng.normal(0, 0.05, x.shape).astype(x.dtype), abstract.ema_params
  )
  pngs = {}
  for num_devices, drawn in ((1, 10), (8, 16)):
    mesh = parallel.make_mesh(devices=jax.devices()[:num_devices])
    grid_sampler = sample_grids.make_grid_sampler(exp, mesh)
    state = types.SimpleNamespace(ema_params=jax.device_put(ema_params, parallel.replicated(mesh)))
    sharded = grid_sampler.sample(state.ema_params, jax.random.PRNGKey(1))
    assert sharded.shape == (drawn, 8, 8, 1) and grid_sampler.num_samples == 10
    assert sharded.sharding.is_equivalent_to(parallel.batch_sharding(mesh), sharded.ndim)
    assert [shard.data.shape[0] for shard in sharded.addressable_shards] == [
      drawn // num_devices
    ] * num_devices
    writer = _ImageWriter()
    sample_grids.write_samples(grid_sampler, state, 7, 1, str(tmp_path / str(num_devices)), writer)
    pngs[num_devices] = np.asarray(
      Image.open(tmp_path / str(num_devices) / "samples" / "step_00000007.png")
    )
    assert writer.images[0] == 7 and writer.images[1]["samples"].shape[0] == 1
  np.testing.assert_array_equal(pngs[1], pngs[8])
  assert pngs[1].std() > 0
