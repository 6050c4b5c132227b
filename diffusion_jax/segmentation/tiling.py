"""Overlap-tile inference (Ronneberger et al. 2015, Sec. 2 and Fig. 2).

An unpadded network maps a tile x tile input to the output x output centre
of it. A whole image is predicted tile by tile, each tile seeing its full
context; beyond the image border that context is the image mirrored. Tiles
are placed `stride` apart, a multiple of 2^depth: the network's pooling then
sees every tile on the same phase, so overlapping tiles agree exactly and the
result equals one pass over the whole mirrored image wherever that pass fits
in memory — no seams. (The paper's stride, the output size 388, is not a
multiple of 16; its tiles differ slightly where the pooling phase changes.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

# [B, tile, tile, C] float32 -> [B, output, output, K] logits
TilePredictor = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TileLayout:
  """Where the tiles of one image go.

  Attributes:
    tile: input side of the network.
    output: output side of the network (tile minus its context).
    stride: distance between neighbouring tiles, a multiple of the network's
      pooling factor, at most `output`.
    image_shape: (H, W) of the image.
  """

  tile: int
  output: int
  stride: int
  image_shape: tuple[int, int]

  @property
  def margin(self) -> int:
    """Context on each side of the output window: (tile - output) / 2."""
    return (self.tile - self.output) // 2

  @property
  def grid(self) -> tuple[int, int]:
    """Tiles along (H, W): enough for their outputs to cover the image."""
    return tuple(
      1 + max(0, math.ceil((side - self.output) / self.stride)) for side in self.image_shape
    )

  @property
  def covered_shape(self) -> tuple[int, int]:
    """(H', W') >= (H, W): the extent the tiles' outputs cover."""
    return tuple((n - 1) * self.stride + self.output for n in self.grid)

  def origins(self) -> list[tuple[int, int]]:
    """Top-left corner of each tile's output in image coordinates, row by row."""
    rows, cols = self.grid
    return [(r * self.stride, c * self.stride) for r in range(rows) for c in range(cols)]


def make_layout(image_shape: tuple[int, int], tile: int, output: int, alignment: int) -> TileLayout:
  """The layout with the largest stride: `output` rounded down to a multiple of `alignment`.

  `alignment` is the network's total pooling factor (2^depth).
  """
  if (tile - output) % 2 or output <= 0:
    raise ValueError(f"a {tile}-pixel tile with a {output}-pixel output has no centred output")
  stride = output - output % alignment
  if stride <= 0:
    raise ValueError(
      f"the output tile ({output} px) is smaller than the pooling factor"
      f" {alignment}: use larger tiles"
    )
  return TileLayout(tile, output, stride, tuple(image_shape))


def mirror_pad(image: np.ndarray, layout: TileLayout) -> np.ndarray:
  """image [H, W, C] extended by mirroring to [H' + 2 margin, W' + 2 margin, C] (Fig. 2).

  The mirror does not repeat the border pixel (numpy's "reflect", scipy's
  "mirror", what the training augmentation uses); it folds again as often as
  a small image needs.
  """
  margin = layout.margin
  extra = [covered - side for covered, side in zip(layout.covered_shape, image.shape[:2])]
  pads = [(margin, margin + extra[0]), (margin, margin + extra[1]), (0, 0)]
  return np.pad(image, pads, mode="reflect")


def extract_tiles(padded: np.ndarray, layout: TileLayout) -> np.ndarray:
  """The network's input tiles [N, tile, tile, C] of a `mirror_pad`ded image, in `origins` order."""
  return np.stack([padded[r : r + layout.tile, c : c + layout.tile] for r, c in layout.origins()])


def stitch(outputs: np.ndarray, layout: TileLayout) -> np.ndarray:
  """Tile outputs [N, output, output, K] placed at their origins, cropped to the image [H, W, K]."""
  canvas = np.zeros((*layout.covered_shape, outputs.shape[-1]), outputs.dtype)
  for (r, c), output in zip(layout.origins(), outputs):
    canvas[r : r + layout.output, c : c + layout.output] = output
  height, width = layout.image_shape
  return canvas[:height, :width]


def predict_batched(predict: TilePredictor, tiles: np.ndarray, batch_size: int) -> np.ndarray:
  """predict() over tiles [N, ...] in batches of exactly batch_size (the last one zero-padded).

  One batch shape: the jitted predictor compiles once.
  """
  outputs = []
  for start in range(0, len(tiles), batch_size):
    batch = tiles[start : start + batch_size]
    count = len(batch)
    if count < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)])
    outputs.append(np.asarray(predict(batch))[:count])
  return np.concatenate(outputs)


def predict_images(
  predict: TilePredictor,
  images: list[np.ndarray],
  tile: int,
  output: int,
  alignment: int,
  batch_size: int = 8,
) -> list[np.ndarray]:
  """Seamless logits [H, W, K] for each image [H, W, C] of any size, tile by tile.

  The tiles of all images go through `predict` together, batch_size at a time.

  Args:
    predict: the network on a batch of tiles, [B, tile, tile, C] -> [B, output, output, K].
    images: float32 [H, W, C] each, as the network was trained on; sizes may differ.
    tile: the network's input side.
    output: its output side.
    alignment: its pooling factor 2^depth; tiles are placed a multiple apart.
    batch_size: tiles per call of `predict`.
  """
  layouts = [make_layout(image.shape[:2], tile, output, alignment) for image in images]
  tiles = [
    extract_tiles(mirror_pad(image, layout), layout) for image, layout in zip(images, layouts)
  ]
  outputs = predict_batched(predict, np.concatenate(tiles), batch_size)
  per_image = np.split(outputs, np.cumsum([len(t) for t in tiles])[:-1])
  return [stitch(out, layout) for out, layout in zip(per_image, layouts)]
