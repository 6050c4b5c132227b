"""Converts a published PyTorch diffusion checkpoint into a workdir that sample and evaluate read.

    python -m launch.convert --input=PATH/ddpm-cifar10-32 --workdir=workdirs/ddpm-cifar10-hub
    python -m launch.sample --workdir=workdirs/ddpm-cifar10-hub --sampler=ddim --steps=50

    python -m launch.convert --input=cifar10_uncond_50M_500K.pt --workdir=workdirs/iddpm-cifar10
    python -m launch.convert --input=64x64_diffusion.pt --workdir=workdirs/adm64 \
        --format=guided_diffusion -- $MODEL_FLAGS $DIFFUSION_FLAGS
    python -m launch.convert --input=model-790000.ckpt --preset=ema_cifar10 --workdir=workdirs/ddpm

Everything after `--` is the source's own flags, as its README writes them
(improved/guided-diffusion: `--image_size 64 --learn_sigma True ...`;
pytorch_diffusion: `--resolution 32`). Writes WORKDIR/config.json, an Orbax
checkpoint with the parameters as EMA parameters (at the source's step when
known) and WORKDIR/convert.json naming the source file and its SHA-256.
WORKDIR must not hold a run, nor be, lie inside or contain the input.
See docs/model_zoo.md for each published family's command.
"""

import json

from absl import flags

from diffusion_jax import convert, logs, outputs
from launch import common

_INPUT = flags.DEFINE_string("input", None, "A diffusers directory or a checkpoint file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The new workdir (must not hold a run).")
_FORMAT = flags.DEFINE_enum(
  "format", None, sorted(convert.FORMATS), "The source; told from the content when not given."
)
_PRESET = flags.DEFINE_string(
  "preset", None, "A released checkpoint's settings, e.g. cifar10_uncond_50M_500K or ema_cifar10."
)
flags.mark_flags_as_required(["input", "workdir"])


def main(argv):
  logs.quiet_library_logs()
  outputs.check_apart(_WORKDIR.value, [_INPUT.value], what="--workdir")  # before a long read
  converted = convert.convert(
    _INPUT.value, _FORMAT.value, _PRESET.value, **convert.parse_source_flags(argv[1:])
  )
  record = convert.write_workdir(converted, _WORKDIR.value)
  print(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
  common.run(main)
