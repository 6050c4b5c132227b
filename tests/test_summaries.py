"""summaries.ScalarWriter: TF-free event files that TensorFlow's and TensorBoard's readers read."""

import os

import numpy as np
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util

from diffusion_jax import summaries


def test_scalars_read_back_by_tensorflow(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (the reference reader)

  with summaries.ScalarWriter(str(tmp_path / "eval")) as writer:
    writer.write_scalars(3, {"ddim-50steps/fid": 12.5, "nll/bpd": 3.25})
    writer.write_scalars(7, {"ddim-50steps/fid": np.float64(1 / 3)})
  (name,) = os.listdir(tmp_path / "eval")
  events = list(tf.compat.v1.train.summary_iterator(str(tmp_path / "eval" / name)))
  assert events[0].file_version == "brain.Event:2"
  values = {(event.step, value.tag): tf.make_ndarray(value.tensor)
            for event in events[1:] for value in event.summary.value}
  assert values == {(3, "ddim-50steps/fid"): 12.5, (3, "nll/bpd"): 3.25,
                    (7, "ddim-50steps/fid"): np.float32(1 / 3)}
  assert all(v.dtype == np.float32 and v.shape == () for v in values.values())


def test_tensorboard_shows_them_as_scalars(tmp_path):
  with summaries.ScalarWriter(str(tmp_path)) as writer:
    writer.write_scalars(1, {"fid": 4.0})
    writer.write_scalars(2, {"fid": 2.0})
  with summaries.ScalarWriter(str(tmp_path)) as writer:  # a second file in the same second
    writer.write_scalars(3, {"fid": 1.0})
  assert len(os.listdir(tmp_path)) == 2
  runs = plugin_event_accumulator.EventAccumulator(str(tmp_path)).Reload()
  assert list(runs.PluginTagToContent("scalars")) == ["fid"]  # the Scalars dashboard's
  assert [(event.step, tensor_util.make_ndarray(event.tensor_proto))
          for event in runs.Tensors("fid")] == [(1, 4.0), (2, 2.0), (3, 1.0)]

