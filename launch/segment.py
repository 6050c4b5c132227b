"""Segments images with a trained segmentation run: overlap-tile inference from its checkpoint.

    python -m launch.segment --workdir=workdirs/cells --input=IMAGE_OR_FOLDER --output=DIR
    python -m launch.segment --workdir=workdirs/cells --input=scans/ --output=masks/ --tile_size=572

For each INPUT/NAME.ext (one file, or every image under a folder) writes
DIR/NAME.png, the class indices at the image's size, and DIR/NAME_panel.png,
image | prediction. Images are predicted tile by tile with mirrored context at
their borders (Ronneberger et al. 2015, Fig. 2); --tile_size sets the
network's input tile (any size the network takes; larger tiles waste less
context). One host.
"""

import sys

import jax
from absl import app, flags

from diffusion_jax.segmentation import inference
from diffusion_jax.train.checkpoint import CheckpointError
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of a segmentation run.")
_INPUT = flags.DEFINE_string("input", None, "An image file, or a folder of them (recursive).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the masks and panels.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to use; default the latest.")
_TILE_SIZE = flags.DEFINE_integer("tile_size", None, "Input tile side; default the training's.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Tiles per network call.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  common.start(argv)
  if jax.process_count() > 1:
    raise app.UsageError("launch.segment runs on one host.")
  try:
    segmenter = inference.load(_WORKDIR.value, _STEP.value, _TILE_SIZE.value, _BATCH_SIZE.value)
    written = inference.segment_files(segmenter, _INPUT.value, _OUTPUT.value)
  except (ValueError, KeyError, FileNotFoundError, CheckpointError) as error:
    sys.exit(f"launch.segment: {error}")
  print(f"Segmented {len(written)} image(s) with step {segmenter.step} into {_OUTPUT.value}.")


if __name__ == "__main__":
  common.run(main)
