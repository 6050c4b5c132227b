"""Augmentation (Ronneberger et al. 2015, Sec. 3.1): shift, rotation, elastic warp, intensity.

A training tile is read from the image through one random coordinate map:
a random centre (the shift), a rotation about it, and a smooth elastic
displacement drawn on a coarse 3x3 grid (Gaussian, 10 pixels standard
deviation) and interpolated bicubically to every pixel. The image is sampled
over the whole input tile, the mask and weight map over its centre (the
network's output window) at the same coordinates, so all three are warped
identically. Where the map leaves the image, the image and the labels are
mirrored, as overlap-tile inference does (Fig. 2).
"""

from __future__ import annotations


import numpy as np
from scipy import ndimage

from diffusion_jax.config.segmentation import AugmentConfig


def elastic_displacement(
  rng: np.random.Generator, size: int, sigma: float, grid: int = 3
) -> np.ndarray:
  """Smooth random displacements float32 [2, size, size] in pixels.

  Drawn as N(0, sigma^2) on a grid x grid lattice spanning the tile, and
  interpolated bicubically (cubic splines) to every pixel.
  """
  coarse = rng.normal(0.0, sigma, (2, grid, grid))
  positions = np.linspace(0, grid - 1, size)
  rows, cols = np.meshgrid(positions, positions, indexing="ij")
  return np.stack(
    [ndimage.map_coordinates(c, [rows, cols], order=3, mode="nearest") for c in coarse]
  ).astype(np.float32)


def random_coordinates(
  rng: np.random.Generator, image_shape: tuple[int, int], tile: int, config: AugmentConfig
) -> np.ndarray:
  """Where each pixel of a tile x tile input tile is read in the image: float32 [2, tile, tile].

  The tile's centre lands anywhere in the image (shift), turned by a random
  angle and flipped, then displaced elastically.
  """
  offsets = np.arange(tile, dtype=np.float32) - (tile - 1) / 2
  rows, cols = np.meshgrid(offsets, offsets, indexing="ij")
  if config.flip and rng.random() < 0.5:
    cols = -cols
  angle = np.deg2rad(rng.uniform(-config.max_rotation, config.max_rotation))
  cos, sin = np.cos(angle), np.sin(angle)
  centre = rng.uniform(0, np.array(image_shape) - 1)
  coords = np.stack([centre[0] + cos * rows - sin * cols, centre[1] + sin * rows + cos * cols])
  if config.elastic_sigma:
    coords += elastic_displacement(rng, tile, config.elastic_sigma, config.elastic_grid)
  return coords.astype(np.float32)


def center_crop(coords: np.ndarray, size: int) -> np.ndarray:
  """The central [2, size, size] window of coordinates [2, T, T]: the output tile's pixels."""
  start = (coords.shape[1] - size) // 2
  return coords[:, start : start + size, start : start + size]


def warp(array: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
  """array [H, W] or [H, W, C] read at coords [2, h, w]: [h, w] or [h, w, C], mirrored outside.

  order 0 (nearest neighbour) for labels, 1 (bilinear) for images and weights.
  """
  if array.ndim == 3:
    return np.stack([warp(array[..., c], coords, order) for c in range(array.shape[-1])], axis=-1)
  return ndimage.map_coordinates(array, coords, order=order, mode="mirror", prefilter=False)


def random_tile(
  rng: np.random.Generator,
  image: np.ndarray,
  mask: np.ndarray,
  weights: np.ndarray,
  tile: int,
  output: int,
  config: AugmentConfig,
):
  """One augmented training example from a whole image.

  Args:
    rng: the randomness of this example.
    image: float32 [H, W, C] in [0, 1].
    mask: class labels [H, W].
    weights: the weight map [H, W] (`weights.weight_map`).
    tile: side of the network's input tile.
    output: side of its output (the centre of the input tile).
    config: which transforms, how strong.

  Returns:
    (image float32 [tile, tile, C] in [0, 1] after the intensity change,
    mask int32 [output, output], weights float32 [output, output]).
  """
  coords = random_coordinates(rng, mask.shape, tile, config)
  inner = center_crop(coords, output)
  image = warp(image, coords, order=1)
  contrast = rng.uniform(1 - config.contrast, 1 + config.contrast)
  brightness = rng.uniform(-config.brightness, config.brightness)
  image = np.clip((image - 0.5) * contrast + 0.5 + brightness, 0, 1)
  return (
    image.astype(np.float32),
    warp(mask, inner, order=0).astype(np.int32),
    warp(weights, inner, order=1).astype(np.float32),
  )
