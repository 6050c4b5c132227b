"""The loss's weight map (Ronneberger et al. 2015, Sec. 3, eq. 2), computed per ground-truth mask.

    w(x) = w_c(x) + w_0 * exp(-(d_1(x) + d_2(x))^2 / (2 sigma^2))

w_c balances the class frequencies; d_1 and d_2 are the distances to the
nearest and the second-nearest object. The second term is large on the thin
background between touching objects, which is what teaches the network to
separate them (Fig. 3). It is computed in the input pipeline, on the host,
with scipy's exact Euclidean distance transform.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from diffusion_jax.config.segmentation import WeightMapConfig

# The border term is computed within this many sigmas of each object; farther
# away it is below w_0 * exp(-MARGIN_SIGMAS^2 / 2) = w_0 * 1.5e-8 and taken as 0.
MARGIN_SIGMAS = 6.0


def class_balance(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """w_c: float32 [H, W], each class's pixels weighted by 1 / its frequency in `mask`.

  Normalised so that every class present gets the same total weight and the
  mean weight is 1: w_c(x) = N / (K' * n_c(x)), N pixels, K' classes present.
  """
  counts = np.bincount(mask.ravel(), minlength=num_classes).astype(np.float64)
  present = np.count_nonzero(counts)
  per_class = np.divide(mask.size, present * counts, out=np.zeros_like(counts), where=counts > 0)
  return per_class.astype(np.float32)[mask]


def objects(mask: np.ndarray, background_class: int = 0) -> np.ndarray:
  """int32 [H, W]: connected components (4-neighbourhood) of the non-background pixels, 1..K.

  Touching objects whose ground truth separates them by a line of background
  (as the paper's data and the synthetic cells do) come out as separate objects.
  """
  labels, _ = ndimage.label(mask != background_class)
  return labels.astype(np.int32)


def two_nearest_distances(
  instances: np.ndarray, margin: float = math.inf
) -> tuple[np.ndarray, np.ndarray]:
  """(d_1, d_2): float32 [H, W] distances to the nearest and second-nearest object.

  The distance to an object is the Euclidean distance to its nearest pixel
  (0 on the object). Each object's distances are computed within `margin`
  pixels of its bounding box and taken as inf beyond; inf also where fewer
  than two objects exist.
  """
  d1 = np.full(instances.shape, np.inf, np.float32)
  d2 = np.full(instances.shape, np.inf, np.float32)
  for index, box in enumerate(ndimage.find_objects(instances), start=1):
    if box is None:
      continue
    window = tuple(
      slice(int(max(0, s.start - margin)), int(min(n, s.stop + margin)))
      for s, n in zip(box, instances.shape)
    )
    distance = ndimage.distance_transform_edt(instances[window] != index).astype(np.float32)
    distance[distance > margin] = np.inf
    near1, near2 = d1[window], d2[window]
    d2[window] = np.where(distance < near1, near1, np.minimum(distance, near2))
    d1[window] = np.minimum(distance, near1)
  return d1, d2


def border_term(instances: np.ndarray, w0: float, sigma: float) -> np.ndarray:
  """w_0 * exp(-(d_1 + d_2)^2 / (2 sigma^2)) on pixels off every object, 0 on objects. [H, W].

  On an object d_1 = 0 and the term would only repeat the distance to its
  neighbour; the paper's maps (Fig. 3d) weight the background between
  objects, so the term is kept there.
  """
  d1, d2 = two_nearest_distances(instances, margin=MARGIN_SIGMAS * sigma)
  term = w0 * np.exp(-np.square(d1 + d2) / (2 * sigma**2))
  return np.where(instances == 0, term, 0.0).astype(np.float32)


def weight_map(mask: np.ndarray, num_classes: int, config: WeightMapConfig) -> np.ndarray:
  """w(x) of eq. 2 for a class mask [H, W] (ints in 0..num_classes-1): float32 [H, W]."""
  weights = (
    class_balance(mask, num_classes) if config.balance_classes else np.ones(mask.shape, np.float32)
  )
  if config.w0:
    weights = weights + border_term(objects(mask, config.background_class), config.w0, config.sigma)
  return weights
