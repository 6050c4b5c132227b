"""What the launchers share: running main() with one-line flag errors, and the start of main()."""

from __future__ import annotations

import sys

from absl import app, flags, logging

from diffusion_jax import configlib, logs, parallel

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Directory of JAX's persistent compilation cache, which lets a"
    " restarted run skip compiling; default $JAX_COMPILATION_CACHE_DIR, else"
    " $DIFFUSION_JAX_CACHE/xla or ~/.cache/diffusion_jax/xla; '' turns it off.")


def run(main) -> None:
  """app.run(main), where an unknown `--config.KEY` override is one line naming it, exit 1."""
  app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parse; a config override of a key the config lacks ends the program in one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):  # what ml_collections raises for a key it lacks
    if error := _unknown_override(argv):
      sys.exit(f"FATAL Flags parsing error: {error}")
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
      "multihost", False, "Join a multi-process run (TPU pod slice); Slurm and"
      " JAX_COORDINATOR_ADDRESS are detected without it.")


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
