"""summaries.EventWriter: TF-free event files that TensorFlow's and TensorBoard's readers read."""

import contextlib
import io
import itertools
import os

import numpy as np

from PIL import Image
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.util import tensor_util

from diffusion_jax import summaries


def test_scalars_read_back_by_tensorflow(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (the reference reader)

  with summaries.EventWriter(str(tmp_path / "eval")) as writer:
    writer.write_scalars(3, {"ddim-50steps/fid": 12.5, "nll/bpd": 3.25})
    writer.write_scalars(7, {"ddim-50steps/fid": np.float64(1 / 3)})
  (name,) = os.listdir(tmp_path / "eval")
  events = list(tf.compat.v1.train.summary_iterator(str(tmp_path / "eval" / name)))
  assert events[0].file_version == "brain.Event:2"
  values = {
    (event.step, value.tag): tf.make_ndarray(value.tensor)
    for event in events[1:]
    for value in event.summary.value
  }
  assert values == {
    (3, "ddim-50steps/fid"): 12.5,
    (3, "nll/bpd"): 3.25,
    (7, "ddim-50steps/fid"): np.float32(1 / 3),
  }
  assert all(v.dtype == np.float32 and v.shape == () for v in values.values())


def test_tensorboard_shows_them_as_scalars(tmp_path, monkeypatch):
  monkeypatch.setattr(summaries, "_FILE_COUNTER", itertools.count(9))  # files 9 and 10
  with summaries.EventWriter(str(tmp_path)) as writer:
    writer.write_scalars(1, {"fid": 4.0})
    writer.write_scalars(2, {"fid": 2.0})
  with summaries.EventWriter(str(tmp_path)) as writer:  # a second file in the same second
    writer.write_scalars(3, {"fid": 1.0})
  assert len(os.listdir(tmp_path)) == 2
  runs = plugin_event_accumulator.EventAccumulator(str(tmp_path)).Reload()
  assert list(runs.PluginTagToContent("scalars")) == ["fid"]  # the Scalars dashboard's
  assert [
    (event.step, tensor_util.make_ndarray(event.tensor_proto)) for event in runs.Tensors("fid")
  ] == [(1, 4.0), (2, 2.0), (3, 1.0)]


def test_images_read_back_as_pngs(tmp_path):
  grid = np.random.default_rng(0).integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
  pair = np.zeros((2, 4, 4, 1), np.uint8)
  with summaries.EventWriter(str(tmp_path)) as writer:
    writer.write_images(2, {"samples": grid, "masks": pair})
  run = event_accumulator.EventAccumulator(str(tmp_path)).Reload()
  assert sorted(run.Tags()["images"]) == ["masks/image/0", "masks/image/1", "samples"]
  (event,) = run.Images("samples")
  assert (event.step, event.width, event.height) == (2, 7, 5)
  np.testing.assert_array_equal(
    np.asarray(Image.open(io.BytesIO(event.encoded_image_string))), grid[0]
  )


def test_a_flush_writes_the_whole_file_and_a_full_file_starts_another(tmp_path):
  def steps(path):
    run = plugin_event_accumulator.EventAccumulator(str(path)).Reload()
    return [e.step for e in run.Tensors("loss")] if "loss" in run.Tags()["tensors"] else []

  writer = summaries.EventWriter(str(tmp_path), flush_every_secs=float("inf"), max_file_bytes=300)
  first = writer.path
  writer.write_scalars(1, {"loss": 1.0})
  assert steps(first) == []  # kept in memory until a flush
  writer.flush()  # the file so far, whole
  assert steps(first) == [1]
  for step in range(2, 8):
    writer.write_scalars(step, {"loss": float(step)})
  writer.close()
  assert len(os.listdir(tmp_path)) > 1 and os.path.getsize(first) >= 300
  assert steps(tmp_path) == list(range(1, 8))


def test_a_training_run_logs_scalars_and_sample_grids(digits_smoke_run):
  """The loop's TensorBoard files (written without TF) hold the loss and the sample grid."""
  run = event_accumulator.EventAccumulator(digits_smoke_run).Reload()
  scalars = plugin_event_accumulator.EventAccumulator(digits_smoke_run).Reload()
  assert "loss" in scalars.PluginTagToContent("scalars")
  assert [event.step for event in scalars.Tensors("loss")][-1] == 4
  (grid,) = run.Images("samples")
  assert grid.step == 4
  # The smoke config's 4 samples of 8x8 digits, 2 by 2 with 2-pixel borders.
  assert Image.open(io.BytesIO(grid.encoded_image_string)).size == (22, 22)


def test_logged_writer_logs_every_process_and_writes_events_only_given_a_logdir(tmp_path, caplog):
  """The training loop's writer: "[step] name=value, ..." sorted by name, events where asked."""
  caplog.set_level("INFO")
  with contextlib.closing(summaries.LoggedWriter(str(tmp_path / "p0"))) as writer:
    writer.write_scalars(5, {"lr": 2e-4, "loss": np.float32(0.25), "skipped_steps": np.int32(0)})
  with contextlib.closing(summaries.LoggedWriter()) as writer:  # another process: no logdir
    writer.write_scalars(5, {"loss": 1 / 3})
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[5]")]
  assert lines == ["[5] loss=0.25, lr=0.0002, skipped_steps=0", "[5] loss=0.333333"]
  (name,) = os.listdir(tmp_path / "p0")
  tags = event_accumulator.EventAccumulator(str(tmp_path / "p0" / name)).Reload().Tags()
  assert sorted(tags["tensors"]) == ["loss", "lr", "skipped_steps"]
