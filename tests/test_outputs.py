"""Outputs never overwrite inputs, nor files that the same run did not write (diffusion_jax.outputs)."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.eval import digits as eval_digits
from diffusion_jax import evaluation, outputs, sampling
from diffusion_jax.segmentation import inference as seg_inference


@pytest.mark.parametrize(
  "output, relation",
  [
    ("in", "is"),
    ("in/masks", "is inside"),
    (".", "contains"),
    ("in/../in", "is"),
  ],
)
def test_output_folder_overlapping_an_input_is_refused(tmp_path, output, relation):
  (tmp_path / "in").mkdir()
  with pytest.raises(
    outputs.OutputConflictError,
    match=f"'{tmp_path / output}' {relation} the input '{tmp_path / 'in'}'",
  ):
    outputs.check_apart(tmp_path / output, [None, "", tmp_path / "in"])


def test_output_through_a_link_to_the_input_is_refused(tmp_path):
  (tmp_path / "in").mkdir()
  os.symlink(tmp_path / "in", tmp_path / "link")
  with pytest.raises(outputs.OutputConflictError, match="is the input"):
    outputs.check_apart(tmp_path / "link", [tmp_path / "in"])
  outputs.check_apart(tmp_path / "out", [tmp_path / "in", tmp_path / "input.png"])  # apart


def test_existing_files_are_refused_unless_overwrite(tmp_path):
  paths = [tmp_path / name for name in ("a.png", "b.png", "c.png")]
  outputs.check_unclaimed(paths, overwrite=False)  # none there yet
  for path in paths[1:]:
    path.write_bytes(b"")
  with pytest.raises(
    outputs.OutputConflictError, match=f"'{paths[1]}' \\(and 1 more\\) already exists.*--overwrite"
  ):
    outputs.check_unclaimed(paths, overwrite=False)
  outputs.check_unclaimed(paths, overwrite=True)


def _constant_batches(value: float):
  """sample_batch_fn(key) -> float32 [2, 2, 2, 1] equal to `value`, whatever the key."""
  return jax.jit(lambda key: jnp.full((2, 2, 2, 1), value) + 0 * jax.random.uniform(key))


def test_sampling_into_a_folder_of_foreign_files_is_refused(tmp_path):
  key = jax.random.key(0)
  (tmp_path / "grid.png").write_bytes(b"someone's grid")
  np.savez(tmp_path / "batch_000000.npz", arr_0=np.zeros((2, 2, 2, 1), np.uint8))
  with pytest.raises(outputs.OutputConflictError, match="batch_000000.npz' \\(and 1 more\\)"):
    sampling.sample_to_files(_constant_batches(1.0), 4, 2, str(tmp_path), key=key)
  assert (tmp_path / "grid.png").read_bytes() == b"someone's grid"
  assert not (tmp_path / "settings.json").exists()
  # --overwrite: every batch is this run's, none of the foreign ones is reused.
  samples = sampling.sample_to_files(
    _constant_batches(1.0), 4, 2, str(tmp_path), key=key, overwrite=True
  )
  assert (samples == 255).all()
  # Another run's settings: refused, or redrawn from scratch with overwrite.
  with pytest.raises(outputs.OutputConflictError, match="settings of another run"):
    sampling.sample_to_files(_constant_batches(-1.0), 4, 2, str(tmp_path), key=jax.random.key(1))
  samples = sampling.sample_to_files(
    _constant_batches(-1.0), 4, 2, str(tmp_path), key=jax.random.key(1), overwrite=True
  )
  assert (samples == 0).all()


def _images(folder, names):
  for name in names:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / name)


def test_inputs_sharing_a_name_keep_their_suffix(tmp_path):
  _images(tmp_path / "in", ["a.png", "a.jpg", "b.png", "sub/a.png"])
  jobs = seg_inference.plan_outputs(str(tmp_path / "in"), str(tmp_path / "out"))
  out = tmp_path / "out"
  assert {os.path.relpath(job.image, tmp_path / "in"): job.mask for job in jobs} == {
    "a.jpg": f"{out}/a.jpg.png",
    "a.png": f"{out}/a.png.png",
    "b.png": f"{out}/b.png",
    "sub/a.png": f"{out}/sub/a.png",
  }
  assert len({path for job in jobs for path in (job.mask, job.panel)}) == 2 * len(jobs)


def test_inputs_whose_names_still_collide_are_refused(tmp_path):
  _images(tmp_path / "in", ["a.jpg", "a.png", "a.jpg.png"])  # a.jpg -> a.jpg.png, as is a.jpg.png
  with pytest.raises(outputs.OutputConflictError, match="a.jpg.png.*would both be written"):
    seg_inference.plan_outputs(str(tmp_path / "in"), str(tmp_path / "out"))


def test_segmenting_over_existing_masks_needs_overwrite(tmp_path):
  _images(tmp_path / "in", ["a.png"])
  _images(tmp_path / "out", ["a.png"])
  with pytest.raises(outputs.OutputConflictError, match="out/a.png' already exists"):
    seg_inference.plan_outputs(str(tmp_path / "in"), str(tmp_path / "out"))
  assert (
    len(seg_inference.plan_outputs(str(tmp_path / "in"), str(tmp_path / "out"), overwrite=True))
    == 1
  )


def test_segmenting_into_the_input_folder_is_refused(tmp_path):
  _images(tmp_path, ["a.png"])
  with pytest.raises(outputs.OutputConflictError, match="is the input"):
    seg_inference.plan_outputs(str(tmp_path), str(tmp_path))
  with pytest.raises(outputs.OutputConflictError, match="contains the input"):
    seg_inference.plan_outputs(str(tmp_path / "a.png"), str(tmp_path))


def test_evaluation_folder_holding_the_samples_file_is_refused(tmp_path):
  config = evaluation.from_config_dict(eval_digits.get_config("smoke"))
  inside = tmp_path / "eval" / f"{config.name}-samples"
  inside.mkdir(parents=True)
  np.savez(inside / "samples.npz", arr_0=np.zeros((4, 8, 8, 1), np.uint8))
  with pytest.raises(outputs.OutputConflictError, match="evaluation folder .* contains the input"):
    evaluation.evaluate(config, str(tmp_path), samples_path=str(inside / "samples.npz"))
  assert os.listdir(inside) == ["samples.npz"]


def test_evaluation_folder_of_foreign_files_needs_overwrite_and_a_rerun_is_its_own(tmp_path):
  """A report.json that no evaluation wrote is refused, named, and kept; --overwrite replaces
  it; the same evaluation again needs no --overwrite; another evaluation of it does."""
  config = eval_digits.get_config("smoke")
  config.update(metrics=("nll",), real_floor=False)  # no run to score: only files are written
  config = evaluation.from_config_dict(config)
  samples = tmp_path / "samples.npz"
  np.savez(samples, arr_0=np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), np.uint8))
  out_dir = tmp_path / "eval" / f"{config.name}-samples"
  out_dir.mkdir(parents=True)
  (out_dir / "report.json").write_text("someone else's report")

  def run(config, **kwargs):
    return evaluation.evaluate(config, str(tmp_path), samples_path=str(samples), **kwargs)

  with pytest.raises(
    outputs.OutputConflictError,
    match=re.escape(
      f"'{out_dir / 'report.json'}' already exists and this run did not write it: pass --overwrite"
    ),
  ):
    run(config)
  assert (out_dir / "report.json").read_text() == "someone else's report"
  first = run(config, overwrite=True)
  assert run(config)["runs"] == first["runs"]  # its own folder now
  assert json.loads((out_dir / "report.json").read_text())["runs"] == first["runs"]
  with pytest.raises(
    outputs.OutputConflictError,
    match="holds the settings of another run: .* --overwrite; they differ in config.pr_k 3 → 5$",
  ):
    run(dataclasses.replace(config, pr_k=5))
