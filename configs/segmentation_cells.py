"""Synthetic touching cells segmented by the classic U-Net (Ronneberger et al. 2015); offline.

    python -m launch.train --config=configs/segmentation_cells.py --workdir=workdirs/cells
    python -m launch.segment --workdir=workdirs/cells --input=IMAGE_OR_FOLDER --output=DIR

The paper's network at 1/8 of its width (features 8 -> 128 instead of
64 -> 1024), all four poolings kept, trained on 316x316 tiles (132x132
outputs) with the paper's weight map and augmentation; minutes on a 2-core
CPU. It trains with Adam: the paper's SGD with momentum 0.99 needs more steps
at this width (docs/segmentation.md). `:full` is the paper's network (64
features, 572x572 tiles, batch 1) with the paper's optimizer; `:smoke` runs in
seconds for tests. The held-out mean IoU, pixel accuracy and an image | truth
| prediction PNG are written every eval_every steps (TensorBoard eval/*,
WORKDIR/segmentation/step_*.png).
"""

import ml_collections

from diffusion_jax.config import segmentation


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds init and the train step
  config.task = "segmentation"  # the loop runs a segmentation experiment (not diffusion)

  config.data = dict(
    source="cells",  # synthetic cell images, generated in code (segmentation/synthetic.py)
    split="train",
    eval_split="test",  # a disjoint stream of synthetic images
    num_images=64,  # training images
    num_eval_images=16,  # held-out images
    image_size=128,  # pixels per side of each synthetic image
    num_channels=1,  # grayscale microscopy
    tile_size=316,  # pixels: input tile; the unpadded U-Net outputs its central 132x132
    seed=0,  # seeds the images, their order and the augmentation
    num_threads=2,  # threads preparing batches (weight maps, warps) ahead of the step
  )

  config.model = dict(
    name="unet_ronneberger",  # the zoo's exact network (23 convolutions, unpadded)
    features=8,  # channels of the first level, doubled per pooling (paper: 64)
    depth=4,  # poolings, as in the paper
    num_classes=2,  # cell, background (borders between cells are background)
  )

  config.weight_map = dict(
    w0=10.0,  # weight of the border term (paper: 10)
    sigma=5.0,  # pixels (paper: ~5)
    balance_classes=True,  # w_c: each class the same total weight
    background_class=0,
  )

  config.augment = dict(
    elastic_sigma=10.0,  # pixels, on a 3x3 coarse grid (paper)
    elastic_grid=3,
    max_rotation=180.0,  # degrees: cells have no orientation
    flip=True,
    brightness=0.1,
    contrast=0.2,
  )

  config.optim = dict(
    optimizer="adam",  # "sgd" with momentum=0.99 is the paper's (the :full variant)
    lr=1e-3,  # on the mean weighted cross-entropy
    warmup_steps=20,  # steps of linear warmup
    grad_clip=1.0,  # global-norm clipping
    momentum=0.99,  # SGD's momentum when optimizer="sgd" (the paper's, Sec. 3)
  )

  config.train = dict(
    batch_size=2,  # tiles per step: large tiles, small batches (paper: 1)
    num_steps=600,  # a few minutes on a 2-core CPU
    ema_decay=0.0,  # evaluate the trained weights themselves (the paper keeps no average)
    log_every=50,  # steps between metric writes
    checkpoint_every=200,  # steps between checkpoints
    keep_checkpoints=2,
    eval_every=200,  # steps between held-out evaluations (IoU + PNG)
  )

  parts = set(variant.split(",")) - {""}
  if unknown := parts - {"full", "smoke"}:
    raise ValueError(
      f"Unknown variant(s) {sorted(unknown)} of configs/segmentation_cells.py;"
      " known: 'full', 'smoke'."
    )
  if "full" in parts:  # the paper's network (31M parameters, 572 -> 388 tiles) and optimizer
    config.model.features = 64
    config.data.update(tile_size=572, image_size=388)
    config.optim.update(optimizer="sgd", lr=0.01)  # momentum 0.99, above
    config.train.update(batch_size=1, num_steps=20_000, checkpoint_every=1000, eval_every=1000)
  if "smoke" in parts:  # seconds: two poolings, 8 features, small images
    config.model.depth = 2
    config.data.update(tile_size=92, image_size=64, num_images=8, num_eval_images=2, num_threads=0)
    config.train.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, eval_every=0)
  return segmentation.complete_config(config)  # every other field at its default
