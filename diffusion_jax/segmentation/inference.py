"""Segmenting image files with a trained run: its checkpoint, overlap-tile inference, PNG masks."""

from __future__ import annotations

import collections
import dataclasses
import functools
import posixpath
from typing import Any, NamedTuple

import jax
import numpy as np
from PIL import Image

from diffusion_jax import files, outputs, parallel, runs
from diffusion_jax import images as image_utils
from diffusion_jax.data import sources as data_sources
from diffusion_jax.segmentation import experiment, metrics, sources, tiling


@dataclasses.dataclass(frozen=True)
class Segmenter:
  """A segmentation run's EMA parameters at one checkpoint, ready to label whole images."""

  exp: experiment.SegmentationExperiment
  params: Any
  step: int  # the training step of the checkpoint
  batch_size: int = 8  # tiles per network call

  @functools.cached_property
  def _predict_tiles(self):
    return functools.partial(
      self.exp.make_predictor(parallel.make_mesh(), self.batch_size), self.params
    )

  def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
    """Class labels int32 [H, W] for each image float32 [H, W, C] in [-1, 1] (any size)."""
    tiles = self.exp.tiles
    logits = tiling.predict_images(
      self._predict_tiles, images, tiles.tile, tiles.output, self.exp.alignment, self.batch_size
    )
    return [np.argmax(image_logits, -1).astype(np.int32) for image_logits in logits]


class SegmentationJob(NamedTuple):
  """One input image and the two files segmenting it writes."""

  image: str
  mask: str  # uint8 class indices at the image's size
  panel: str  # image | prediction, side by side


def load(
  workdir: str,
  step: int | None = None,
  tile_size: int | None = None,
  batch_size: int = 8,
  *,
  trust_model_code: bool = False,
) -> Segmenter:
  """The segmentation run in `workdir` at its latest checkpoint (or `step`).

  `tile_size` replaces the training tile (larger tiles waste less context);
  `batch_size` is rounded up to a multiple of the device count. A model
  factory named in the workdir's config.json is imported only with
  `trust_model_code` (`runs.load_run_config`).

  Raises:
    FileNotFoundError: no config.json or no checkpoint.
    ValueError: the workdir holds a diffusion run, names an untrusted model
      factory, or the tile does not fit the network.
  """
  config = runs.load_run_config(workdir, trust_model_code=trust_model_code)
  if config.get("task") != "segmentation":
    raise ValueError(
      f"{workdir} holds a diffusion run, not a segmentation run"
      " (its config.json has no task 'segmentation')."
    )
  if tile_size:
    config.data.tile_size = tile_size
  exp = experiment.build(config)
  abstract = jax.eval_shape(exp.init_state, jax.random.key(0)).ema_params
  params, checkpoint_step = runs.restore_ema(workdir, abstract, step)
  devices = parallel.make_mesh().size
  return Segmenter(exp, params, checkpoint_step, -(-batch_size // devices) * devices)


def input_files(path: str) -> tuple[str, list[str]]:
  """(root, image files relative to it): one file, or every image under a folder (sorted)."""
  if files.is_file(path):
    return files.join(files.path(path).parent), [files.path(path).name]
  if not files.is_dir(path):
    raise FileNotFoundError(f"--input {path!r} is neither an image file nor a folder")
  names = files.find_files(path, data_sources.IMAGE_SUFFIXES)
  if not names:
    raise FileNotFoundError(f"folder {path!r} holds no image files {data_sources.IMAGE_SUFFIXES}")
  return path, names


def output_paths(names: list[str], output: str) -> list[tuple[str, str]]:
  """(mask, panel) paths under `output` for each of `names` (relative paths), none shared.

  DIR/NAME.ext gives OUTPUT/DIR/NAME.png and NAME_panel.png; files whose
  paths would be shared (a.png and a.jpg) keep their suffix: a.jpg.png.

  Raises:
    outputs.OutputConflictError: two inputs still share an output path, naming both.
  """

  def paths(name: str, keep_suffix: bool) -> tuple[str, str]:
    base = name if keep_suffix else posixpath.splitext(name)[0]
    return files.join(output, f"{base}.png"), files.join(output, f"{base}_panel.png")

  plain = [paths(name, keep_suffix=False) for name in names]
  uses = collections.Counter(path for pair in plain for path in pair)
  chosen = [
    paths(name, keep_suffix=True) if any(uses[path] > 1 for path in pair) else pair
    for name, pair in zip(names, plain)
  ]
  writer: dict[str, str] = {}
  for name, pair in zip(names, chosen):
    for path in pair:
      if path in writer:
        raise outputs.OutputConflictError(
          f"input images '{writer[path]}' and '{name}' would both"
          f" be written to '{path}': rename one of them"
        )
      writer[path] = name
  return chosen


def plan_outputs(path: str, output: str, *, overwrite: bool = False) -> list[SegmentationJob]:
  """What segmenting an image file or a folder of them writes, checked before anything is.

  Raises:
    FileNotFoundError: no image at `path`.
    outputs.OutputConflictError: OUTPUT is, lies inside or contains the input;
      two inputs share an output; a file exists at an output path and not `overwrite`.
  """
  root, names = input_files(path)
  outputs.check_apart(output, [path])
  targets = output_paths(names, output)
  outputs.check_unclaimed([target for pair in targets for target in pair], overwrite=overwrite)
  return [
    SegmentationJob(files.join(root, name), mask, panel)
    for name, (mask, panel) in zip(names, targets)
  ]


def segment_files(segmenter: Segmenter, jobs: list[SegmentationJob]) -> list[str]:
  """Segments each job's image (`plan_outputs`); returns the written masks.

  Writes the mask (uint8 class indices at the image's size) and the panel
  (image | prediction in colour). Images are converted and resized as in
  training (data.num_channels, data.resize).
  """
  data = segmenter.exp.data
  for job in jobs:
    pixels = sources.read_image(job.image)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    image, _ = sources.prepare_image(
      pixels, np.zeros(pixels.shape[:2], np.int32), data.num_channels, data.resize
    )
    labels = segmenter.predict([image * 2.0 - 1.0])[0]
    height, width = pixels.shape[:2]
    mask = np.asarray(
      Image.fromarray(labels.astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST)
    )
    image_utils.save_png(mask, job.mask)
    shown = metrics.to_rgb(np.round(image * 255).astype(np.uint8))
    picture = metrics.side_by_side([shown[None], metrics.colorize(labels)[None]])
    image_utils.save_png(picture, job.panel)
  return [job.mask for job in jobs]
