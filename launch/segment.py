"""Segments images with a trained segmentation run: overlap-tile inference from its checkpoint.

    python -m launch.segment --workdir=workdirs/cells --input=IMAGE_OR_FOLDER --output=DIR
    python -m launch.segment --workdir=workdirs/cells --input=scans/ --output=masks/ --tile_size=572

For each INPUT/NAME.ext (one file, or every image under a folder) writes
DIR/NAME.png, the class indices at the image's size, and DIR/NAME_panel.png,
image | prediction. Images are predicted tile by tile with mirrored context at
their borders (Ronneberger et al. 2015, Fig. 2); --tile_size sets the
network's input tile (any size the network takes; larger tiles waste less
context). One host.

DIR must be apart from the input (not the folder, inside it, or around it);
inputs that would share a name (a.png and a.jpg) keep their suffix (a.jpg.png),
and files already at the output paths are refused unless --overwrite. A model
factory that the workdir's config.json names is imported only with
--trust_model_code.
"""

import jax
from absl import app, flags

from diffusion_jax.segmentation import inference
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of a segmentation run.")
_INPUT = flags.DEFINE_string("input", None, "An image file, or a folder of them (recursive).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the masks and panels.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to use; default the latest.")
_TILE_SIZE = flags.DEFINE_integer("tile_size", None, "Input tile side; default the training's.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Tiles per network call.")
_TRUST_MODEL_CODE = common.define_trust_model_code_flag()
_OVERWRITE = common.define_overwrite_flag()
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  common.start(argv)
  if jax.process_count() > 1:
    raise app.UsageError("launch.segment runs on one host.")
  jobs = inference.plan_outputs(_INPUT.value, _OUTPUT.value, overwrite=_OVERWRITE.value)
  segmenter = inference.load(
    _WORKDIR.value,
    _STEP.value,
    _TILE_SIZE.value,
    _BATCH_SIZE.value,
    trust_model_code=_TRUST_MODEL_CODE.value,
  )
  written = inference.segment_files(segmenter, jobs)
  print(f"Segmented {len(written)} image(s) with step {segmenter.step} into {_OUTPUT.value}.")


if __name__ == "__main__":
  common.run(main)
