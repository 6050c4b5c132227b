"""TensorBoard event files, written without TensorFlow, through the path layer (local or gs://).

    with summaries.EventWriter(logdir) as writer:
      writer.write_scalars(step, {"fid": 3.2, "is": 9.1})
      writer.write_images(step, {"samples": grid_1xHxWxC})

Each scalar is stored as `tf.summary.scalar` stores it in TF 2 (a float32
scalar tensor tagged with the "scalars" plugin) and each image as a PNG
`Summary.Image`, so TensorBoard and `tf.compat.v1.train.summary_iterator` read
these files as they read clu's. Training and evaluation write them without
TensorFlow's GCS client, which reaches nothing but the real GCS (no emulator,
no other fsspec filesystem).

An object store cannot append, so the writer keeps the records of its current
file in memory and writes the whole file, atomically (`files.write_bytes`: one
upload on GCS, a rename locally), on `flush()`, on `close()` and after a write
when `flush_every_secs` have passed since the last one. The trade-off: a crash
loses at most the last `flush_every_secs` of summaries, and each flush
rewrites the file so far; once that passes `max_file_bytes` the writer starts
a new file (TensorBoard reads every event file of a folder), which bounds the
upload per flush. GCS accepts one write per second to an object: keep
`flush_every_secs` above that.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Mapping

import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter

from diffusion_jax import files, images

# Tells apart the event files of writers opened in the same second by one process; zero-padded,
# because TensorBoard reads a run's files in the order of their names (9 after 10 otherwise).
_FILE_COUNTER = itertools.count()


class _Records:
  """A file-like sink for `RecordWriter`: the TFRecord-framed bytes of one event file."""

  def __init__(self):
    self.chunks: list[bytes] = []
    self.size = 0

  def write(self, data: bytes) -> None:
    self.chunks.append(data)
    self.size += len(data)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class EventWriter:
  """Writes scalars and images to event files in `logdir`; a context manager.

  The training loop writes through a `LoggedWriter`, which keeps one of these
  on process 0.
  """

  def __init__(
    self, logdir: str, *, flush_every_secs: float = 10.0, max_file_bytes: int = 16 << 20
  ):
    self.logdir = logdir
    self.flush_every_secs = flush_every_secs
    self.max_file_bytes = max_file_bytes
    self.path = ""  # the event file being written
    self._start_file()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One event at `step` holding every `tag: value` of `scalars`."""
    self._write_values(
      step,
      [
        summary_pb2.Summary.Value(
          tag=tag,
          tensor=_float32_scalar(value),
          metadata=scalar_metadata.create_summary_metadata(display_name=None, description=None),
        )
        for tag, value in scalars.items()
      ],
    )

  def write_images(self, step: int, images_by_tag: Mapping[str, np.ndarray]) -> None:
    """One event at `step` with each uint8 [N, H, W, C] batch as N PNG images.

    A batch of one keeps its tag; image i of a larger batch is tagged `tag/image/i`,
    as TF 1's image summaries were.
    """
    values = []
    for tag, batch in images_by_tag.items():
      batch = np.asarray(batch)
      for i, image in enumerate(batch):
        values.append(
          summary_pb2.Summary.Value(
            tag=tag if len(batch) == 1 else f"{tag}/image/{i}",
            image=summary_pb2.Summary.Image(
              height=image.shape[0],
              width=image.shape[1],
              colorspace=image.shape[2],
              encoded_image_string=images.encode_png(image),
            ),
          )
        )
    self._write_values(step, values)

  def flush(self) -> None:
    """Writes the current event file whole, atomically."""
    files.write_bytes(self.path, b"".join(self._records.chunks))
    self._last_flush = time.monotonic()

  def close(self) -> None:
    self.flush()

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _start_file(self) -> None:
    """A new event file: its name, and the version record every event file starts with."""
    self.path = files.join(
      self.logdir,
      f"events.out.tfevents.{int(time.time()):010d}"
      f".{socket.gethostname()}.{os.getpid()}.{next(_FILE_COUNTER):06d}.v2",
    )
    self._records = _Records()
    self._record_writer = RecordWriter(self._records)
    self._record_writer.write(
      event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
    )
    self.flush()

  def _write_values(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    self._record_writer.write(
      event_pb2.Event(
        wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
      ).SerializeToString()
    )
    if time.monotonic() - self._last_flush >= self.flush_every_secs:
      self.flush()
    if self._records.size >= self.max_file_bytes:
      self.flush()
      self._start_file()


class LoggedWriter:
  """The training loop's writer: each write in this process's log, and in `logdir`'s event files.

  Every process logs ("[step] loss=0.0412, lr=0.0002"); give `logdir` on process 0
  only. Like clu's logging writer, without importing TensorFlow (seconds per launch).
  """

  def __init__(self, logdir: str | None = None):
    self._events = EventWriter(logdir) if logdir is not None else None

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    logging.info("[%d] %s", step, ", ".join(_format_scalars(scalars)))
    if self._events:
      self._events.write_scalars(step, scalars)

  def write_images(self, step: int, images_by_tag: Mapping[str, np.ndarray]) -> None:
    shapes = {tag: np.shape(batch) for tag, batch in images_by_tag.items()}
    logging.info("[%d] Images: %s.", step, shapes)
    if self._events:
      self._events.write_images(step, images_by_tag)

  def flush(self) -> None:
    if self._events:
      self._events.flush()

  def close(self) -> None:
    if self._events:
      self._events.close()


def _format_scalars(scalars: Mapping[str, float]) -> list[str]:
  """["name=value", ...] sorted by name: Python floats to 6 digits, NumPy values as they print."""
  return [
    f"{name}={value:.6g}" if isinstance(value, float) else f"{name}={value}"
    for name, value in sorted(scalars.items())
  ]


def _float32_scalar(value: float) -> tensor_pb2.TensorProto:
  return tensor_pb2.TensorProto(
    dtype=types_pb2.DT_FLOAT,
    float_val=[float(value)],
    tensor_shape=tensor_shape_pb2.TensorShapeProto(),
  )
