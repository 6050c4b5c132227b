"""TensorBoard scalar summaries, written without TensorFlow.

    with summaries.ScalarWriter(logdir) as writer:
      writer.write_scalars(step, {"fid": 3.2, "is": 9.1})

Each scalar is stored as `tf.summary.scalar` stores it in TF 2 (a float32
scalar tensor tagged with the "scalars" plugin), so TensorBoard and
`tf.compat.v1.train.summary_iterator` read these files as they read clu's;
but evaluation, which writes them, then never imports TensorFlow (seconds, and
its start-up log) unless it reads TFDS data.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Mapping

from tensorboard.compat.proto import (event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2,
                                      types_pb2)
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter

# Tells apart the event files of writers opened in the same second by one process.
_FILE_COUNTER = itertools.count()


class ScalarWriter:
  """Appends scalars to a new event file in `logdir` (created if missing); a context manager."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
            f".{os.getpid()}.{next(_FILE_COUNTER)}.v2")
    self.path = os.path.join(logdir, name)
    self._records = RecordWriter(open(self.path, "xb"))  # pylint: disable=consider-using-with
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One event at `step` holding every `tag: value` of `scalars`."""
    values = [summary_pb2.Summary.Value(tag=tag, metadata=scalar_metadata.create_summary_metadata(
        display_name=None, description=None), tensor=_float32_scalar(value))
              for tag, value in scalars.items()]
    self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                summary=summary_pb2.Summary(value=values)))

  def close(self) -> None:
    self._records.close()

  def __enter__(self) -> ScalarWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _write(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()


def _float32_scalar(value: float) -> tensor_pb2.TensorProto:
  return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)],
                                tensor_shape=tensor_shape_pb2.TensorShapeProto())
