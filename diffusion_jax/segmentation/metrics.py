"""Segmentation metrics: pixel accuracy, per-class and mean IoU, merged objects; the PNG panel."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Class colours of the panels (RGB): background black, then white, red, green, blue, ...
PALETTE = np.array(
  [
    (0, 0, 0),
    (255, 255, 255),
    (230, 60, 60),
    (60, 200, 60),
    (60, 100, 230),
    (230, 200, 40),
    (200, 60, 200),
    (40, 200, 220),
  ],
  np.uint8,
)


def confusion_matrix(target: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [K, K]: entry (i, j) counts pixels of true class i predicted as j."""
  index = target.astype(np.int64).ravel() * num_classes + prediction.astype(np.int64).ravel()
  return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def pixel_accuracy(confusion: np.ndarray) -> float:
  """Fraction of pixels whose class is predicted right."""
  return float(np.trace(confusion) / max(confusion.sum(), 1))


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
  """float64 [K]: |true_c AND predicted_c| / |true_c OR predicted_c|; NaN for a class in neither."""
  intersection = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - intersection
  return np.divide(intersection, union, out=np.full_like(intersection, np.nan), where=union > 0)


def mean_iou(confusion: np.ndarray) -> float:
  """The mean of `per_class_iou` over the classes that occur (in the truth or the prediction)."""
  return float(np.nanmean(per_class_iou(confusion)))


def majority_baseline(confusion: np.ndarray) -> float:
  """The mean IoU of predicting the truth's most frequent class everywhere, on the same pixels.

  That class's IoU is its frequency, every other class's 0.
  """
  counts = confusion.sum(1)
  baseline = np.zeros((len(counts), len(counts)), np.int64)
  baseline[:, np.argmax(counts)] = counts
  return mean_iou(baseline)


def summary(confusion: np.ndarray, prefix: str = "eval/") -> dict[str, float]:
  """The logged scalars: pixel accuracy, mean IoU, the majority baseline, each class's IoU."""
  scores = {
    f"{prefix}pixel_accuracy": pixel_accuracy(confusion),
    f"{prefix}mean_iou": mean_iou(confusion),
    f"{prefix}majority_mean_iou": majority_baseline(confusion),
  }
  for index, iou in enumerate(per_class_iou(confusion)):
    if np.isfinite(iou):
      scores[f"{prefix}iou_class{index}"] = float(iou)
  return scores


def merged_objects(
  predicted_foreground: np.ndarray, instances: np.ndarray, min_fraction: float = 0.5
) -> int:
  """How many predicted objects hold two or more true objects: touching cells not separated.

  Args:
    predicted_foreground: bool [H, W]; its connected components (4-neighbourhood)
      are the predicted objects.
    instances: int [H, W], the true objects 1..K (0 elsewhere).
    min_fraction: a true object counts as held by the predicted object that
      covers at least this fraction of its pixels.
  """
  components, _ = ndimage.label(predicted_foreground)
  sizes = np.bincount(instances.ravel())
  pairs, overlap = np.unique(
    np.stack([instances.ravel(), components.ravel()]), axis=1, return_counts=True
  )
  held = (pairs[0] > 0) & (pairs[1] > 0) & (overlap >= min_fraction * sizes[pairs[0]])
  _, counts = np.unique(pairs[1, held], return_counts=True)
  return int(np.count_nonzero(counts >= 2))


def colorize(mask: np.ndarray) -> np.ndarray:
  """Class labels [H, W] -> uint8 [H, W, 3] in the PALETTE's colours (cycled beyond it)."""
  return PALETTE[mask % len(PALETTE)]


def side_by_side(columns: list[np.ndarray], gap: int = 2) -> np.ndarray:
  """Columns of uint8 [N, H, W, 3] images as one uint8 picture: row n shows image n of each column.

  Rows and columns are separated by `gap` gray pixels.
  """
  rows = []
  for row in zip(*columns):
    spacer = np.full((row[0].shape[0], gap, 3), 128, np.uint8)
    rows.append(np.concatenate([part for image in row for part in (spacer, image)][1:], axis=1))
  spacer = np.full((gap, rows[0].shape[1], 3), 128, np.uint8)
  return np.concatenate([part for row in rows for part in (spacer, row)][1:])


def to_rgb(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 1 or 3] -> [..., 3]."""
  return np.broadcast_to(images, (*images.shape[:-1], 3)) if images.shape[-1] == 1 else images


def panel(images: np.ndarray, targets: np.ndarray, predictions: np.ndarray) -> np.ndarray:
  """uint8 rows of image | ground truth | prediction: [N * H, 3 * W, 3] plus 2-pixel gaps.

  Args:
    images: uint8 [N, H, W, C] (C = 1 or 3).
    targets: class labels [N, H, W].
    predictions: class labels [N, H, W].
  """
  return side_by_side([to_rgb(images), colorize(targets), colorize(predictions)])
