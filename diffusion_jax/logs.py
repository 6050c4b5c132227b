"""Readable console output: progress and metrics, without the libraries' INFO chatter."""

import logging
import os

_CHATTY_LIBRARIES = ("/orbax/", "/grain/", "/tensorflow_datasets/")


class _QuietLibraries(logging.Filter):
  """Drops INFO and DEBUG records from Orbax, grain and TFDS; keeps their warnings."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
      lib in record.pathname for lib in _CHATTY_LIBRARIES
    )


def quiet_library_logs() -> None:
  """Installs the filter on absl's handler (call from an entry point's main)."""
  from absl import logging as absl_logging

  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


def quiet_tensorflow() -> None:
  """Keeps TensorFlow's C++ start-up messages off stderr; call before anything imports it.

  TensorFlow 2.21 logs "oneDNN custom operations are on" twice while it
  loads, whatever TF_CPP_MIN_LOG_LEVEL says; turning the oneDNN ops off
  removes it, and TF_CPP_MIN_LOG_LEVEL=1 the CPU-feature notice that takes
  its place. diffusion_jax computes nothing with TensorFlow (it decodes TFDS
  records and writes training summaries), so the ops change no result.
  Variables the user set are left as they are.
  """
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
