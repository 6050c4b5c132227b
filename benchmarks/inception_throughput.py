"""Inception feature throughput: our jitted FID Inception against pytorch-fid's on PyTorch.

    python -m benchmarks.inception_throughput --batch_size=16 --rounds=3
    python -m benchmarks.inception_throughput --batch_size=16 --xla_defaults
    python -m benchmarks.inception_throughput --image_size=299 --resize=pytorch-fid

Ours: `inception.apply_inception` under jax.jit with `parallel.compiler_options`
(resize of uint8 [B, S, S, 3] to 299, the network, pool3 + unbiased logits +
spatial features), from a host uint8 batch to host arrays.
Theirs: pytorch-fid's `InceptionV3([3])` (resize_input, normalize_input: its
own bilinear resize to 299, pool3 only) under torch.no_grad, from the same
uint8 batch (u / 255, NCHW) to a numpy pool3; `torch.set_num_threads(cores)`.
Both networks get the same random weights (`peers.random_inception_state_dict`:
He-normal convolutions, so activations keep their scale; no denormals in either).

Rounds alternate ours and theirs, so a busy machine slows both alike; each
side's best round is reported.
"""

import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import peers
from diffusion_jax import parallel
from diffusion_jax.evaluation import inception

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the square uint8 input images.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed batches per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of `steps` batches, ours then theirs.")
_RESIZE = flags.DEFINE_enum("resize", "tf", list(inception.RESIZE_MODES), "Our resize mode.")
_COMPILER_OPTIONS = flags.DEFINE_multi_string(
  "compiler_option", [], "XLA option for our program, NAME=VALUE, over parallel.compiler_options."
)
_XLA_DEFAULTS = flags.DEFINE_bool(
  "xla_defaults", False, "Compile ours with XLA's defaults, not parallel.compiler_options."
)
_CHANNELS_LAST = flags.DEFINE_bool("torch_channels_last", False, "Run theirs in channels_last.")


def import_pytorch_fid():
  """pytorch_fid.inception, or None when torch / pytorch-fid are not installed."""
  try:
    peers.import_torchvision()
    from pytorch_fid import inception as pytorch_fid_inception  # noqa: PLC0415
  except ImportError:
    return None
  import torch  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  return pytorch_fid_inception


def theirs(pytorch_fid_inception, state_dict, images, channels_last: bool):
  """run() -> pool3 numpy [B, 2048] through pytorch-fid's InceptionV3([3])."""
  import torch  # noqa: PLC0415

  original = pytorch_fid_inception.load_state_dict_from_url
  torch_state = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  pytorch_fid_inception.load_state_dict_from_url = lambda *_, **__: torch_state  # no download
  try:
    model = pytorch_fid_inception.InceptionV3([3]).eval()
  finally:
    pytorch_fid_inception.load_state_dict_from_url = original
  layout = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=layout)

  def run():
    with torch.no_grad():
      x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
      (pool,) = model(x.contiguous(memory_format=layout))
    return pool[:, :, 0, 0].numpy()

  return run


def ours(state_dict, images, options: dict):
  """(run() -> host features, compile seconds) for our jitted apply_inception."""
  variables = inception.params_from_state_dict(state_dict)
  fn = jax.jit(inception.apply_inception, static_argnames="resize", compiler_options=options)
  start = time.perf_counter()
  compiled = fn.lower(variables, images, resize=_RESIZE.value).compile()
  compile_s = time.perf_counter() - start
  return lambda: jax.device_get(compiled(variables, images)), compile_s


def timed(run, steps: int) -> float:
  """Seconds per batch over `steps` calls."""
  start = time.perf_counter()
  for _ in range(steps):
    run()
  return (time.perf_counter() - start) / steps


def main(argv):
  del argv
  batch, side = _BATCH_SIZE.value, _IMAGE_SIZE.value
  images = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  options = ({} if _XLA_DEFAULTS.value else parallel.compiler_options(mesh)) | dict(
    item.split("=", 1) for item in _COMPILER_OPTIONS.value
  )
  pytorch_fid_inception = import_pytorch_fid()
  if pytorch_fid_inception is None:
    raise app.UsageError("The peer needs torch, torchvision and pytorch-fid (the `test` extra).")
  state_dict = peers.random_inception_state_dict()
  run_ours, compile_s = ours(state_dict, images, options)
  run_theirs = theirs(pytorch_fid_inception, state_dict, images, _CHANNELS_LAST.value)
  runs = {"ours (jax)": run_ours, "pytorch-fid (torch)": run_theirs}
  for run in runs.values():
    run()  # warm-up
  seconds = {name: [] for name in runs}
  for _ in range(_ROUNDS.value):
    for name, run in runs.items():
      seconds[name].append(timed(run, _STEPS.value))
  print(
    f"batch {batch} of {side}x{side}x3 uint8 -> 299, resize {_RESIZE.value!r} (ours), "
    f"{os.cpu_count()} cores ({jax.devices()[0].platform}); compiler options {options or 'none'}; "
    f"our compile {compile_s:.1f} s; torch {'channels_last' if _CHANNELS_LAST.value else 'NCHW'}"
  )
  print(f"{'':<22}{'best s/batch':>13}{'median':>9}{'images/s':>10}")
  for name, times in seconds.items():
    print(
      f"{name:<22}{min(times):>13.3f}{statistics.median(times):>9.3f}{batch / min(times):>10.1f}"
    )
  ours_s, theirs_s = (min(times) for times in seconds.values())
  print(f"ratio ours/theirs (images/s): {theirs_s / ours_s:.2f}")


if __name__ == "__main__":
  app.run(main)
