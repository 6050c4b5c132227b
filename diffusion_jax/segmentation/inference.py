"""Segmenting image files with a trained run: its checkpoint, overlap-tile inference, PNG masks."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np
from PIL import Image

from diffusion_jax import files, parallel
from diffusion_jax import images as image_utils
from diffusion_jax.segmentation import experiment, metrics, sources, tiling
from diffusion_jax.train import checkpoint, inference


@dataclasses.dataclass(frozen=True)
class Segmenter:
  """A segmentation run's EMA parameters at one checkpoint, ready to label whole images."""

  exp: experiment.SegmentationExperiment
  params: Any
  step: int  # the training step of the checkpoint
  batch_size: int = 8  # tiles per network call

  @functools.cached_property
  def _predict_tiles(self):
    return functools.partial(self.exp.make_predictor(parallel.make_mesh(), self.batch_size),
                             self.params)

  def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
    """Class labels int32 [H, W] for each image float32 [H, W, C] in [-1, 1] (any size)."""
    tiles = self.exp.tiles
    logits = tiling.predict_images(self._predict_tiles, images, tiles.tile, tiles.output,
                                   self.exp.alignment, self.batch_size)
    return [np.argmax(image_logits, -1).astype(np.int32) for image_logits in logits]


def load(workdir: str, step: int | None = None, tile_size: int | None = None,
         batch_size: int = 8) -> Segmenter:
  """The segmentation run in `workdir` at its latest checkpoint (or `step`).

  `tile_size` replaces the training tile (larger tiles waste less context);
  `batch_size` is rounded up to a multiple of the device count.

  Raises:
    FileNotFoundError: no config.json or no checkpoint.
    ValueError: the workdir holds a diffusion run, or the tile does not fit the network.
  """
  config = checkpoint.load_config(workdir)
  if config.get("task") != "segmentation":
    raise ValueError(f"{workdir} holds a diffusion run, not a segmentation run"
                     " (its config.json has no task 'segmentation').")
  if tile_size:
    config.data.tile_size = tile_size
  exp = experiment.build(config)
  params, checkpoint_step = inference.restore_ema(exp, workdir, step)
  devices = parallel.make_mesh().size
  return Segmenter(exp, params, checkpoint_step, -(-batch_size // devices) * devices)


def input_files(path: str) -> tuple[str, list[str]]:
  """(root, image files relative to it): one file, or every image under a folder (sorted)."""
  if files.is_file(path):
    return files.join(files.path(path).parent), [files.path(path).name]
  if not files.is_dir(path):
    raise FileNotFoundError(f"--input {path!r} is neither an image file nor a folder")
  names = files.find_files(path, sources.IMAGE_SUFFIXES)
  if not names:
    raise FileNotFoundError(f"folder {path!r} holds no image files {sources.IMAGE_SUFFIXES}")
  return path, names


def segment_files(segmenter: Segmenter, path: str, output: str) -> list[str]:
  """Segments an image file or a folder of them; returns the written masks.

  For each INPUT/NAME.ext writes OUTPUT/NAME.png (uint8 class indices, the
  image's size) and OUTPUT/NAME_panel.png (image | prediction in colour).
  Images are converted and resized as in training (data.num_channels,
  data.resize); masks come back at the image's own size.
  """
  root, names = input_files(path)
  data = segmenter.exp.data
  written = []
  for name in names:
    pixels = sources.read_image(files.join(root, name))
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    image, _ = sources.prepare_image(pixels, np.zeros(pixels.shape[:2], np.int32),
                                     data.num_channels, data.resize)
    labels = segmenter.predict([image * 2.0 - 1.0])[0]
    height, width = pixels.shape[:2]
    mask = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(
        (width, height), Image.Resampling.NEAREST))
    stem = files.join(output, os.path.splitext(name)[0])
    image_utils.save_png(mask, f"{stem}.png")
    shown = metrics.to_rgb(np.round(image * 255).astype(np.uint8))
    picture = metrics.side_by_side([shown[None], metrics.colorize(labels)[None]])
    image_utils.save_png(picture, f"{stem}_panel.png")
    written.append(f"{stem}.png")
  return written
