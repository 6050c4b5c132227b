"""Speed you can see: FLOPs of compiled programs, peak FLOP/s per device kind, MFU, peak memory.

  flops = perf.compiled_flops(jax.jit(step).lower(state, batch).compile())  # per device
  rates = perf.rates(steps=100, seconds=12.0, flops_per_step=flops, batch_size=128,
                     peak=perf.peak_flops(jax.devices()[0].device_kind, "bfloat16"))
  # {"steps_per_sec", "images_per_sec", "tflops_per_device", "mfu"}

FLOPs are XLA's cost analysis: a compiled (partitioned) program's count is one
device's; a lowered one's is the whole program's, over all devices. XLA counts
the body of a loop (`lax.scan`) once, whatever its trip count: a program whose
work sits in a loop must be counted another way (one network call times the
calls, or the same work without the loop), see `train/loop.py` and
`runs.draw_samples`. Model FLOPs utilisation (MFU) is achieved FLOP/s per
device over the device's peak dense FLOP/s (`PEAK_FLOPS`) at JAX's default
matmul precision in the compute dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

# Peak dense FLOP/s of one JAX device, by device_kind, for bfloat16 and float32 inputs at JAX's
# default precision: on a TPU float32 matmuls and convolutions run as one bfloat16 pass (so
# both are the MXU's bfloat16 peak); on an NVIDIA GPU since Ampere as TF32. TPU v2 and v3 show
# each core as a device (half a chip); v4 and later one chip. Vendors' data sheets.
PEAK_FLOPS: dict[str, dict[str, float]] = {
  "TPU v2": {"bfloat16": 22.5e12, "float32": 22.5e12},
  "TPU v3": {"bfloat16": 61.5e12, "float32": 61.5e12},
  "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
  "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
  "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
  "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
  "A100": {"bfloat16": 312e12, "float32": 156e12},
  "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
  "H100": {"bfloat16": 989.4e12, "float32": 494.7e12},  # SXM
  "H200": {"bfloat16": 989.4e12, "float32": 494.7e12},
}

# device_kind as JAX spells it (lowercased) -> PEAK_FLOPS' key; the first match wins.
_KIND_PATTERNS = (
  ("v5 lite", "TPU v5e"),
  ("v5e", "TPU v5e"),
  ("v5p", "TPU v5p"),
  ("tpu v5", "TPU v5p"),
  ("v6 lite", "TPU v6e"),
  ("v6e", "TPU v6e"),
  ("tpu v4", "TPU v4"),
  ("tpu v3", "TPU v3"),
  ("tpu v2", "TPU v2"),
  ("h200", "H200"),
  ("h100 pcie", "H100 PCIe"),
  ("h100", "H100"),
  ("a100", "A100"),
)


def device_peak_name(device_kind: str) -> str | None:
  """PEAK_FLOPS' key for a `jax.Device.device_kind` ("NVIDIA H100 80GB HBM3" -> "H100"); None: unknown."""
  kind = device_kind.lower()
  return next((name for pattern, name in _KIND_PATTERNS if pattern in kind), None)


def peak_flops(device_kind: str, dtype: Any) -> float | None:
  """Peak dense FLOP/s of one device of `device_kind` computing in `dtype`; None when unknown.

  Any dtype other than bfloat16/float16 counts as float32 (float16 as bfloat16).
  """
  name = device_peak_name(device_kind)
  if name is None:
    return None
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return PEAK_FLOPS[name]["bfloat16" if half else "float32"]


def probe_peak_flops(dtype: Any = jnp.float32, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` [size, size] matmuls in `dtype` on the default device.

  A measured stand-in for a peak where `PEAK_FLOPS` has none (a CPU): what
  XLA's dot reaches on this machine now, not a data-sheet figure.
  """
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def compiled_flops(compiled: jax.stages.Compiled) -> float:
  """FLOPs of one run of a compiled program on one device (XLA's cost analysis; 0 if none)."""
  return float((compiled.cost_analysis() or {}).get("flops", 0.0))


def lowered_flops(lowered: jax.stages.Lowered, num_devices: int) -> float:
  """FLOPs of one run of a lowered (not compiled) program per device: the whole count / devices."""
  return float((lowered.cost_analysis() or {}).get("flops", 0.0)) / num_devices


def rates(
  steps: int, seconds: float, flops_per_step: float, batch_size: int, peak: float | None
) -> dict[str, float]:
  """Throughput of `steps` steps of `batch_size` images in `seconds`, each `flops_per_step` per device.

  -> steps_per_sec, images_per_sec, tflops_per_device and (when `peak`, FLOP/s
  per device, is known) mfu, the fraction of it achieved.
  """
  steps_per_sec = steps / seconds
  achieved = flops_per_step * steps_per_sec
  out = {
    "steps_per_sec": steps_per_sec,
    "images_per_sec": batch_size * steps_per_sec,
    "tflops_per_device": achieved / 1e12,
  }
  if peak:
    out["mfu"] = achieved / peak
  return out


def peak_memory(devices=None) -> dict[str, int]:
  """{str(device): peak bytes in use} of the local devices that report it (GPUs, TPUs; not CPUs)."""
  out = {}
  for device in devices or jax.local_devices():
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out[str(device)] = int(stats["peak_bytes_in_use"])
  return out


def max_peak_memory_gib(devices=None) -> float | None:
  """The largest `peak_memory` of the local devices in GiB; None when none reports it."""
  peaks = peak_memory(devices)
  return max(peaks.values()) / 2**30 if peaks else None


def compiled_memory_bytes(compiled: jax.stages.Compiled) -> int:
  """Bytes one device needs to run `compiled`: arguments, outputs and temporaries, less donated.

  XLA's `memory_analysis` of the compiled program (also on a CPU), before running it.
  """
  m = compiled.memory_analysis()
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def largest_batch(
  fits, start: int, granule: int, deadline: float, max_batch: int = 1 << 16
) -> tuple[int, bool]:
  """(a multiple of `granule` for which `fits(batch)`, whether the search finished); 0: none fits.

  Doubles from `start` until a batch does not fit (or passes `max_batch`), then
  bisects between the last that did and the first that did not, to one granule
  or an eighth. Past
  `deadline` (time.perf_counter()) it stops with the largest batch found so far.
  """
  in_time = lambda: time.perf_counter() < deadline
  low, high = 0, start
  while high <= max_batch and in_time() and fits(high):
    low, high = high, 2 * high
  if low and high > max_batch:  # the largest batch asked for fits
    return low, True
  if low == 0 and start > granule and in_time():
    return largest_batch(fits, granule, granule, deadline, max_batch)
  while high - low > max(granule, low // 8) and in_time():  # to within 1/8
    middle = (low + high) // 2 // granule * granule
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low, in_time()


def format_rates(values: dict[str, float]) -> str:
  """E.g. "3.1 steps/s, 396 images/s, 12.3 TFLOP/s per device, MFU 41.0%" (no MFU when unknown)."""
  text = (
    f"{values['steps_per_sec']:.3g} steps/s, {values['images_per_sec']:.4g} images/s,"
    f" {values['tflops_per_device']:.3g} TFLOP/s per device"
  )
  return text + (f", MFU {values['mfu']:.1%}" if "mfu" in values else ", MFU unknown")


@dataclasses.dataclass
class Meter:
  """Throughput between reads: the steps and host seconds since the last `read`, less `excluded`.

  Read it after a host sync (the loop's metric fetch), so that the steps
  counted have run; it adds none itself.
  """

  flops_per_step: float  # per device
  batch_size: int  # images per step, over all devices
  peak: float | None  # FLOP/s per device; None: unknown (no MFU)
  last_step: int  # the step the first window starts after
  _start: float = dataclasses.field(default_factory=time.perf_counter)
  _excluded: float = 0.0

  @contextlib.contextmanager
  def excluded(self) -> Iterator[None]:
    """Leaves the host time of the block (a periodic hook, a checkpoint save) out of the window."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - start

  def read(self, step: int) -> dict[str, float]:
    """`rates` of the steps after `last_step` up to `step`; starts the next window."""
    now = time.perf_counter()
    out = rates(
      step - self.last_step,
      now - self._start - self._excluded,
      self.flops_per_step,
      self.batch_size,
      self.peak,
    )
    self.last_step, self._start, self._excluded = step, now, 0.0
    return out


class StepTrace:
  """A jax.profiler trace of the steps `first` to `last` into `log_dir` (none when `steps` is None).

  `around(step)` wraps each step's dispatch: it starts the trace before step
  `first` and annotates each traced step for the profile plugin's step view;
  `after(step, state)` stops it once step `last` has run, waiting for `state`
  (the one host sync it adds, at that step only). Closing stops a trace a run
  ended inside.
  """

  def __init__(self, steps: tuple[int, int] | None, log_dir: str):
    self._steps, self._log_dir, self._active = steps, log_dir, False

  def around(self, step: int) -> contextlib.AbstractContextManager:
    if self._steps is None or not self._steps[0] <= step <= self._steps[1]:
      return contextlib.nullcontext()
    if not self._active:
      jax.profiler.start_trace(self._log_dir, create_perfetto_trace=True)
      self._active = True
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def after(self, step: int, state: Any) -> None:
    if self._active and step == self._steps[1]:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
      logging.info("Profiler trace of steps %d-%d written to %s.", *self._steps, self._log_dir)
