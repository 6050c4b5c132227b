"""Readable console output: progress and metrics, without the libraries' INFO chatter."""

import logging

_CHATTY_LIBRARIES = ("/orbax/", "/grain/", "/tensorflow_datasets/")


class _QuietLibraries(logging.Filter):
  """Drops INFO and DEBUG records from Orbax, grain and TFDS; keeps their warnings."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        lib in record.pathname for lib in _CHATTY_LIBRARIES)


def quiet_library_logs() -> None:
  """Installs the filter on absl's handler (call from an entry point's main)."""
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
