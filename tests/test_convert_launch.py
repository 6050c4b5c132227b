"""Converted checkpoints as runs: launch.convert, launch.sample, convert.load."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from diffusion_jax import convert, images, sampling, weightfiles
from diffusion_jax.runs import load_ema_for_sampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")


def _run(module: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *flags], cwd=REPO, capture_output=True, text=True, timeout=600
  )


def test_convert_then_sample(tmp_path):
  source = str(tmp_path / "model-790000.ckpt")
  shutil.copy(os.path.join(DATA, "pytorch_diffusion_small.pt"), source)
  workdir = tmp_path / "converted"
  result = _run(
    "launch.convert",
    f"--input={source}",
    f"--workdir={workdir}",
    "--",
    "--resolution",
    "16",
    "--step=790000",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((workdir / "convert.json").read_text())
  assert record["sha256"] == weightfiles.sha256(source) and record["path"] == source
  assert record["format"] == "pytorch_diffusion" and record["step"] == 790000

  output = tmp_path / "samples"
  result = _run(
    "launch.sample",
    f"--workdir={workdir}",
    "--num_samples=4",
    "--batch_size=8",
    "--sampler=ddim",
    "--steps=2",
    f"--output={output}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  samples = np.load(output / "samples.npz")["arr_0"]
  assert samples.shape == (4, 16, 16, 3) and samples.dtype == np.uint8 and samples.std() > 0
  assert json.loads((output / "settings.json").read_text())["checkpoint_step"] == 790000

  result = _run(
    "launch.convert", f"--input={source}", f"--workdir={workdir}", "--", "--resolution", "16"
  )
  assert result.returncode == 1 and "already holds a run" in result.stderr


def test_convert_errors_are_one_line(tmp_path):
  result = _run(
    "launch.convert",
    f"--input={os.path.join(DATA, 'iddpm_small.pt')}",
    f"--workdir={tmp_path / 'w'}",
    "--format=improved_diffusion",
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "pass image_size" in result.stderr.strip().splitlines()[-1]


def test_load_is_the_workdirs_ema_model_with_rescaled_timesteps(tmp_path):
  """convert.load and the written workdir give one EmaModel; its apply_fn takes diffusion t."""
  arrays = dict(np.load(os.path.join(DATA, "iddpm_small.npz")))
  path = os.path.join(DATA, "iddpm_small.pt")
  flags = dict(image_size=32, num_heads=2, diffusion_steps=4000, learn_sigma=True)
  loaded = convert.load(path, "improved_diffusion", **flags)
  convert.write_workdir(convert.convert(path, "improved_diffusion", **flags), str(tmp_path))
  restored = load_ema_for_sampling(str(tmp_path))

  assert (loaded.spec, loaded.image_shape, loaded.num_classes, loaded.step) == (
    restored.spec,
    restored.image_shape,
    restored.num_classes,
    restored.step,
  )
  assert loaded.schedule.num_timesteps == restored.schedule.num_timesteps == 4000
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(loaded.params), jax.device_get(restored.params)
  )
  for model in (loaded, restored):
    out = jax.jit(model.apply_fn)(model.params, arrays["x"], arrays["t"], None)
    assert np.abs(np.asarray(out) - arrays["out"]).max() < 1e-4


def test_a_conversion_that_disagrees_with_its_config_writes_nothing(tmp_path):
  path = os.path.join(DATA, "iddpm_small.pt")
  converted = convert.convert(
    path, "improved_diffusion", image_size=32, num_heads=2, diffusion_steps=4000, learn_sigma=True
  )
  params = flax.traverse_util.flatten_dict(converted.params, sep="/")
  name = sorted(params)[0]
  params[name] = params[name][..., :1]
  broken = dataclasses.replace(converted, params=flax.traverse_util.unflatten_dict(params, sep="/"))
  with pytest.raises(
    ValueError,
    match=r"The converted parameter .* has shape .*, the model of"
    r" its config .*: the conversion and the config disagree",
  ):
    convert.write_workdir(broken, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_converted_improved_diffusion_samples_with_the_edm_sampler(tmp_path):
  """A learned-sigma, rescaled-timestep T=4000 improved-diffusion model through the discrete
  adapter: launch.sample --sampler=edm_heun equals edm_sample of its denoiser."""
  path = os.path.join(DATA, "iddpm_small.pt")
  flags = dict(image_size=32, num_heads=2, diffusion_steps=4000, learn_sigma=True)
  convert.write_workdir(convert.convert(path, "improved_diffusion", **flags), str(tmp_path / "w"))
  output = tmp_path / "samples"
  result = _run(
    "launch.sample",
    f"--workdir={tmp_path / 'w'}",
    "--num_samples=8",
    "--batch_size=8",
    "--sampler=edm_heun",
    "--steps=3",
    f"--output={output}",
    "--compilation_cache=",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  samples = np.load(output / "samples.npz")["arr_0"]
  assert samples.shape == (8, 32, 32, 3) and samples.std() > 0

  model = load_ema_for_sampling(str(tmp_path / "w"))
  assert model.spec.learns_variance and model.schedule.num_timesteps == 4000
  denoiser = sampling.denoisers.from_discrete(
    lambda x, t: model.apply_fn(model.params, x, t, None), model.spec, model.schedule
  )
  _, key = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))  # batch 0, as drawn
  direct = jax.jit(lambda key: sampling.edm_sample(denoiser, key, (8, 32, 32, 3), num_steps=3))(key)
  assert np.abs(images.to_uint8(direct).astype(int) - samples).max() <= 1
