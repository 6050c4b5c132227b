"""Device mesh, sharding rules and multi-host set-up.

One code path for 1 CPU, 8 GPUs or a TPU pod slice: arrays are global
`jax.Array`s laid out by `NamedSharding`s over a mesh with a "data" axis (the
batch) and an optional "model" axis (FSDP: parameters split over it). The
train step is `jax.jit`ted with these shardings; XLA inserts the collectives.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from diffusion_jax import files

DATA_AXIS = "data"
MODEL_AXIS = "model"

# XLA:CPU lowers convolutions to YNNPACK by default; its Eigen convolutions
# run the U-Nets' train step ~1.7x faster (benchmarks/train_throughput.py),
# while dots and reductions stay fastest in YNNPACK.
CPU_COMPILER_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


# A run's processes and this one's rank, set by hand instead of detected from the cluster.
COORDINATOR_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize_distributed(multihost: bool = False) -> None:
  """Calls `jax.distributed.initialize()` for a run over several processes.

  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, when set, win
  over everything else: a manual launch on any cluster, or a pod launch
  rehearsed off-TPU (tests/test_cluster_launchers.py). Otherwise, with
  `multihost` (TPU pod slices: launch/tpu_pod.sh passes --multihost) JAX
  detects the cluster itself; without it, initialises only for a Slurm job
  with several tasks (launch/slurm.sbatch).
  """
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    if missing := [name for name in COORDINATOR_VARIABLES if name not in os.environ]:
      raise ValueError(
        f"JAX_COORDINATOR_ADDRESS is set but not {', '.join(missing)}: a"
        f" multi-process launch sets all of {', '.join(COORDINATOR_VARIABLES)}."
      )
    jax.distributed.initialize(
      coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  elif multihost or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  else:
    return
  logging.info(
    "Process %d of %d, %d local / %d global devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache: a restarted run loads its compiled programs.

  Launchers call this (launch/common.py), never the library at import.

  Args:
    cache_dir: the cache's directory. None: JAX's own setting when made
      ($JAX_COMPILATION_CACHE_DIR), else files.default_cache_dir()/xla
      ($DIFFUSION_JAX_CACHE/xla or ~/.cache/diffusion_jax/xla). "": off.

  Returns:
    The directory in use, or None when off.
  """
  if cache_dir == "":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if cache_dir is None:
    cache_dir = jax.config.jax_compilation_cache_dir or os.path.join(
      files.default_cache_dir(), "xla"
    )
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  return cache_dir


def make_mesh(model_parallelism: int = 1, devices=None) -> Mesh:
  """A (data, model) mesh over all devices; model_parallelism=1 is pure data parallelism."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if devices.size % model_parallelism:
    raise ValueError(
      f"model_parallelism={model_parallelism} does not divide the {devices.size} devices."
    )
  grid = devices.reshape(devices.size // model_parallelism, model_parallelism)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def compiler_options(mesh: Mesh) -> dict[str, str]:
  """XLA options for programs compiled onto `mesh`: CPU_COMPILER_OPTIONS on CPUs, none elsewhere.

  Options this jaxlib's XLA:CPU does not accept are left out, with one warning:
  the flag is experimental, and a jaxlib without it must still compile.
  """
  if mesh.devices.flat[0].platform != "cpu":
    return {}
  return dict(_accepted_cpu_options(tuple(sorted(CPU_COMPILER_OPTIONS.items()))))


@functools.cache
def _accepted_cpu_options(options: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
  """The (name, value) options with which XLA:CPU compiles a trivial program (cached: once each)."""
  accepted = []
  for name, value in options:
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
        jax.ShapeDtypeStruct((), np.float32, sharding=SingleDeviceSharding(jax.devices("cpu")[0]))
      ).compile()
    except jax.errors.JaxRuntimeError as error:
      logging.warning(
        "XLA:CPU rejects compiler option %s=%s (%s); compiling without it.", name, value, error
      )
      continue
    accepted.append((name, value))
  return tuple(accepted)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int = 2**14) -> P:
  """Splits a parameter's largest divisible dimension over the model axis (FSDP).

  Small parameters (biases, norms) stay replicated: splitting them costs more
  in collectives than it saves in memory.
  """
  if axis_size == 1 or int(np.prod(shape)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % axis_size == 0:
      return P(*[MODEL_AXIS if d == dim else None for d in range(len(shape))])
  return P()


def state_shardings(mesh: Mesh, abstract_state):
  """Shardings for every leaf of a (possibly abstract) train state.

  Replicated under pure data parallelism; FSDP-split when the mesh has a
  model axis of size > 1. Scalars and the rng are always replicated.
  """
  axis_size = mesh.shape[MODEL_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, axis_size)), abstract_state)
