"""What the launchers share: the start of main() and the persistent compilation cache's flag."""

from absl import app, flags, logging

from diffusion_jax import logs, parallel

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Directory of JAX's persistent compilation cache, which lets a"
    " restarted run skip compiling; default $JAX_COMPILATION_CACHE_DIR, else"
    " $DIFFUSION_JAX_CACHE/xla or ~/.cache/diffusion_jax/xla; '' turns it off.")


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
