"""What the launchers share: one-line user errors, the flags every launcher has, main()'s start.

Every launcher runs its main() through `run`: an error the user causes and
can fix (USER_ERRORS: a bad flag or config value, a missing or damaged file,
bad data, an unsupported checkpoint, an output that would overwrite an input)
ends the program with one line on stderr, `launch.NAME: what was wrong`, and
exit status 1. `--verbose` or DIFFUSION_JAX_VERBOSE=1 raises it with its
traceback instead. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import zipfile
from collections.abc import Callable

import jax
from absl import app, flags, logging

from diffusion_jax import checkpoint, configlib, logs, parallel
from diffusion_jax.data import DatasetUnavailableError
from diffusion_jax.checkpoint import CheckpointError

VERBOSE_ENV = "DIFFUSION_JAX_VERBOSE"
MAX_MESSAGE_CHARS = 600  # a longer message is cut, so an error never floods the terminal

# What the user causes and can fix. ValueError covers the library's own error classes
# (ConvertError, ConfigChangeError, WeightFileError, OutputConflictError,
# UntrustedModelCodeError) and json.JSONDecodeError; OSError covers missing files and
# Pillow's UnidentifiedImageError; EOFError and BadZipFile are numpy's truncated .npy / .npz.
USER_ERRORS = (
  app.UsageError,
  ValueError,
  KeyError,
  OSError,
  EOFError,
  zipfile.BadZipFile,
  CheckpointError,
  DatasetUnavailableError,
)


_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  None,
  "Directory of JAX's persistent compilation cache, which lets a"
  " restarted run skip compiling; default $JAX_COMPILATION_CACHE_DIR, else"
  " $DIFFUSION_JAX_CACHE/xla or ~/.cache/diffusion_jax/xla; '' turns it off.",
)
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, f"Show an error's traceback instead of one line (or set {VERBOSE_ENV}=1)."
)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main), where a user error or a bad flag is one line on stderr and exit 1."""
  app.run(functools.partial(_main_with_one_line_errors, main), flags_parser=_parse_flags)


def one_line(error: BaseException) -> str:
  """`error`'s message on one line, without TensorStore specs, at most MAX_MESSAGE_CHARS long."""
  text = checkpoint.without_tensorstore_specs(" ".join(str(error).split())) or type(error).__name__
  if isinstance(error, KeyError):  # str(KeyError("x")) is "'x'": say what it is
    text = f"missing key {text}"
  if len(text) > MAX_MESSAGE_CHARS:
    text = text[: MAX_MESSAGE_CHARS - 1] + "…"
  return text


def program_name() -> str:
  """'launch.sample' for `python -m launch.sample` (from sys.argv[0], launch/sample.py)."""
  return f"launch.{os.path.splitext(os.path.basename(sys.argv[0]))[0]}"


def _main_with_one_line_errors(main: Callable[[list[str]], None], argv: list[str]) -> None:
  try:
    main(argv)
  except USER_ERRORS as error:
    if _VERBOSE.value or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
      raise
    # The work that the error abandoned may still finish in library threads (TensorStore reads
    # of a damaged checkpoint calling back into a closed asyncio loop); what those raise
    # cannot be caught, and would print tracebacks around the one line.
    sys.unraisablehook = lambda unraisable: None
    sys.exit(f"{program_name()}: {one_line(error)}")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parse, where a bad flag or an unknown `--config.KEY` override is one line, exit 1."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, OSError) as error:  # OSError: a --config file that cannot be read
    sys.exit(f"{program_name()}: flags: {one_line(error)}")
  except (AttributeError, KeyError):  # what ml_collections raises for a key it lacks
    if error := _unknown_override(argv):
      sys.exit(f"{program_name()}: flags: {error}")
    raise


def _unknown_override(argv: list[str]) -> str | None:
  """The message naming the first `--config.KEY=...` whose KEY the --config file lacks."""
  if "config" not in flags.FLAGS:
    return None
  flag = flags.FLAGS["config"]
  config = flag.parser.parse(_flag_argument(argv, "config") or flag.default)
  for arg in argv[1:]:
    if arg.startswith("--config."):
      if error := configlib.unknown_key(config, arg.removeprefix("--config.").partition("=")[0]):
        return error
  return None


def _flag_argument(argv: list[str], name: str) -> str | None:
  """The value of `--name=VALUE` or `--name VALUE` in argv."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.partition("=")[2]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def define_multihost_flag() -> flags.FlagHolder:
  """--multihost, for the launchers that run as one job over several hosts.

  launch.train, launch.sample and launch.evaluate; its value goes to
  `parallel.maybe_initialize_distributed`.
  """
  return flags.DEFINE_bool(
    "multihost",
    False,
    "Join a multi-process run (TPU pod slice); Slurm and"
    " JAX_COORDINATOR_ADDRESS are detected without it.",
  )


def define_trust_model_code_flag() -> flags.FlagHolder:
  """--trust_model_code, for the launchers that build a model from a workdir's config.json."""
  return flags.DEFINE_bool(
    "trust_model_code",
    False,
    "Import and run the model factory ('package.module:factory')"
    " that the workdir's config.json names; only for workdirs whose code you trust.",
  )


def define_overwrite_flag() -> flags.FlagHolder:
  """--overwrite, for the launchers that write files into a folder the user names."""
  return flags.DEFINE_bool(
    "overwrite", False, "Replace files in the output folder that this run did not write."
  )


def define_profile_flag() -> flags.FlagHolder:
  """--profile_dir, for the launchers whose whole run one jax.profiler trace may capture."""
  return flags.DEFINE_string(
    "profile_dir",
    None,
    "Write a jax.profiler trace of the whole run into this folder"
    " (TensorBoard's profile plugin, or its perfetto_trace.json.gz in ui.perfetto.dev).",
  )


def profiled(profile_dir: str | None) -> contextlib.AbstractContextManager:
  """jax.profiler.trace(profile_dir) (with a Perfetto file), or nothing when it is None."""
  if not profile_dir:
    return contextlib.nullcontext()
  return jax.profiler.trace(profile_dir, create_perfetto_trace=True)


def enable_compilation_cache() -> None:
  """parallel.enable_compilation_cache with --compilation_cache; call it first in main()."""
  cache_dir = parallel.enable_compilation_cache(_COMPILATION_CACHE.value)
  logging.info("Compilation cache: %s.", cache_dir or "off")


def start(argv) -> None:
  """The start of a launcher's main(): no stray arguments, quiet library logs, the cache on."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  enable_compilation_cache()
