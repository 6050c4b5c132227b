"""Synthetic cell microscopy: touching, irregular cells with thin borders, offline and seeded.

A stand-in for the paper's light-microscopy data (Ronneberger et al. 2015,
Sec. 4): cells that press against each other, separated only by a faint,
thin dark line that the ground truth labels as background. Separating them is
what the border term of the weight map is for (Sec. 3, Fig. 3), so the set
makes that term matter. Every image is a function of (seed, split, index).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

SPLITS = {"train": 0, "test": 1}  # split name -> its stream of the seed


@dataclasses.dataclass(frozen=True)
class CellImage:
  """One synthetic image with its labels.

  Attributes:
    image: uint8 [H, W, 1].
    mask: uint8 [H, W], 1 inside a cell, 0 for the background and the
      borders between touching cells.
    instances: int32 [H, W], 0 off cells (and on their borders), 1..K one id per cell.
  """

  image: np.ndarray
  mask: np.ndarray
  instances: np.ndarray


def _cell_shapes(rng: np.random.Generator, size: int, radius: tuple[float, float]):
  """(centres [K, 2], half-axes [K, 2]) of cells packed until they touch.

  Centres are drawn at random and kept when no closer than 0.75 of the sum of
  the mean radii to any other: neighbours then overlap a little, and share a
  border once each pixel goes to its nearest cell.
  """
  centres, axes = np.zeros((0, 2)), np.zeros((0, 2))
  for _ in range(int(4 * size * size / radius[0] ** 2)):
    centre, half_axes = rng.uniform(0, size, 2), rng.uniform(*radius, 2)
    distances = np.hypot(*(centres - centre).T)
    if np.all(distances > 0.75 * (half_axes.mean() + axes.mean(axis=1))):
      centres, axes = np.vstack([centres, centre]), np.vstack([axes, half_axes])
  return centres, axes


def _normalized_distance(coords_2xHxW, centre, axes, rng) -> np.ndarray:
  """|x - c| / r(angle) for an irregular rotated ellipse: < 1 inside. [H, W]."""
  dy, dx = coords_2xHxW[0] - centre[0], coords_2xHxW[1] - centre[1]
  angle = np.arctan2(dy, dx)
  tilt = rng.uniform(0, np.pi)
  a, b = axes
  radius = a * b / np.hypot(b * np.cos(angle - tilt), a * np.sin(angle - tilt))
  for harmonic in (2, 3, 5):  # an uneven outline
    radius = radius * (1 + rng.uniform(0, 0.08) * np.cos(harmonic * angle + rng.uniform(0, 6.3)))
  return np.hypot(dy, dx) / radius


def _instances(rng, size: int, radius) -> np.ndarray:
  """int32 [size, size]: each pixel's nearest cell (1..K) where it is inside one, else 0."""
  centres, axes = _cell_shapes(rng, size, radius)
  coords = np.mgrid[0:size, 0:size].astype(np.float32)
  distances = np.stack([_normalized_distance(coords, c, ab, rng) for c, ab in zip(centres, axes)])
  nearest = np.argmin(distances, axis=0)
  return np.where(np.min(distances, axis=0) < 1, nearest + 1, 0).astype(np.int32)


def contact_borders(instances: np.ndarray) -> np.ndarray:
  """bool [H, W]: cell pixels with a 4-neighbour in another cell (2 px wide lines)."""
  padded = np.pad(instances, 1, mode="edge")
  border = np.zeros(instances.shape, bool)
  for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
    neighbour = padded[dy : dy + instances.shape[0], dx : dx + instances.shape[1]]
    border |= (neighbour != instances) & (neighbour > 0) & (instances > 0)
  return border


def _render(
  rng, instances: np.ndarray, border: np.ndarray, contrast: float, noise: float
) -> np.ndarray:
  """Intensities in [0, 1]: dim background, brighter cells of varying tone, faint dark borders."""
  size = instances.shape[0]
  tone = np.concatenate([[0.0], rng.uniform(0.25, 0.45, instances.max())])[instances]
  texture = ndimage.gaussian_filter(rng.normal(0, 1, instances.shape), 2)
  image = 0.25 + tone + 0.05 * texture / np.std(texture)
  image -= contrast * border
  image = ndimage.gaussian_filter(image, 0.7)
  shading = ndimage.zoom(rng.uniform(-0.1, 0.1, (3, 3)), size / 3, order=1)[:size, :size]
  return np.clip(image + shading + rng.normal(0, noise, image.shape), 0, 1)


def make_cells(
  seed: int,
  split: str,
  index: int,
  size: int = 128,
  radius: tuple[float, float] = (9.0, 16.0),
  border_contrast: float = 0.25,
  noise: float = 0.08,
) -> CellImage:
  """Synthetic image `index` of `split` ("train" or "test"), a function of its arguments only.

  Args:
    seed: the data set's seed; each (seed, split, index) draws its own image.
    split: "train" or "test": disjoint streams of images.
    index: which image of the split.
    size: height = width in pixels.
    radius: range of the cells' half-axes in pixels.
    border_contrast: how much darker the border between touching cells is
      than the cells (intensities in [0, 1]); small values make them hard to see.
    noise: standard deviation of the Gaussian pixel noise.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown cells split {split!r}; known: {sorted(SPLITS)}")
  rng = np.random.default_rng([seed, SPLITS[split], index])
  instances = _instances(rng, size, radius)
  border = contact_borders(instances)
  image = _render(rng, instances, border, border_contrast, noise)
  instances = np.where(border, 0, instances)
  return CellImage(
    image=np.round(image * 255).astype(np.uint8)[..., None],
    mask=(instances > 0).astype(np.uint8),
    instances=instances,
  )


@dataclasses.dataclass(frozen=True)
class CellsSource:
  """A random-access source of `num_images` synthetic cells: records {"image", "mask"}.

  Images are drawn on first access and kept (a few MB for the default sizes).
  """

  seed: int
  split: str
  num_images: int
  size: int = 128
  _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_images:
      raise IndexError(f"cells index {index} out of range [0, {self.num_images})")
    if index not in self._cache:
      cells = make_cells(self.seed, self.split, index, self.size)
      self._cache[index] = {"image": cells.image, "mask": cells.mask}
    return self._cache[index]
