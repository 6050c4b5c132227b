"""Test-wide setup: 8 fake CPU devices, a compilation cache, and the repository on sys.path."""

import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after XLA_FLAGS)

# Training tests compile the same small programs in several runs; reuse them.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "diffusion_jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# configs/ and launch/ live at the repository root, beside the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
