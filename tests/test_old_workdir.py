"""A workdir written before the one-way layers (tests/data/old_digits_run) still samples and resumes."""

import json
import os
import shutil

import numpy as np

from configs import digits
from diffusion_jax import runs, sampling
from diffusion_jax.train import loop

OLD_RUN = os.path.join(os.path.dirname(__file__), "data", "old_digits_run")


def _copy(tmp_path) -> str:
  """The old run copied to tmp_path: resuming writes into its workdir."""
  workdir = str(tmp_path / "run")
  shutil.copytree(OLD_RUN, workdir)
  return workdir


def _config(num_steps: int):
  """The old run's command line as a config today (README.md beside it)."""
  config = digits.get_config("smoke")
  config.model.update(ch=32, ch_mult=(1,), attn_resolutions=())
  config.train.update(num_steps=num_steps, checkpoint_every=2, batch_size=8)
  return config


def test_the_run_loader_reads_and_samples_an_old_run(tmp_path):
  model = runs.load_ema_for_sampling(_copy(tmp_path))
  assert (model.step, model.image_shape, model.num_classes) == (2, (8, 8, 1), None)
  samples = runs.draw_samples(
    model, sampling.SamplerConfig(sampler="ddim", steps=2), 8, 8, str(tmp_path / "samples"), seed=0
  )
  assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8


def test_an_old_run_resumes_with_only_its_step_count_changed(tmp_path):
  workdir = _copy(tmp_path)
  state = loop.train_and_evaluate(_config(num_steps=4), workdir)
  assert int(state.step) == 4
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    history = [json.loads(line) for line in f]
  assert [(entry["step"], entry["changes"]) for entry in history] == [
    (2, {"train.num_steps": [2, 4]})
  ]
