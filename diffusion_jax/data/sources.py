"""Random-access sources of training images.

A source is a sequence (`len(source)`, `source[i]`) of records
`{"image": uint8 [H, W, C], "label": int}`; the label may be missing
(unconditional datasets). Sizes and channel counts may differ between records:
`transforms.Preprocess` brings them to one shape. Random access is what lets
grain shuffle globally, shard by process and resume from a recorded position.
"""

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax.data.config import DataConfig

# File suffixes (lower case) that `FolderSource` picks up.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# What Pillow raises for unreadable, truncated, corrupted or oversized files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Images held in memory.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int [N].
  """

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}


# The digits' held-out split: 300 of the 1,797, drawn once with this seed.
DIGITS_TEST_SIZE = 300
DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = ("train", "test")


def digits_split_indices(split: str, total: int = 1797) -> np.ndarray:
  """The rows of `split`, in dataset order: "test" is a fixed random 300, "train" the rest.

  Random, not the last 300: scikit-learn's digits come in blocks by writer,
  and a held-out set of other writers would not measure the training
  distribution.
  """
  if split not in DIGITS_SPLITS:
    raise ValueError(f"unknown digits split {split!r}; known: {DIGITS_SPLITS}")
  test = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(total)[:DIGITS_TEST_SIZE]
  in_test = np.isin(np.arange(total), test)
  return np.flatnonzero(in_test if split == "test" else ~in_test)


def digits_source(split: str = "train") -> ArraySource:
  """scikit-learn's handwritten digits: uint8 [N, 8, 8, 1], labels 0..9.

  `split` "train" holds 1,497 of the 1,797 digits, "test" the other 300
  (held out for NLL and sample-quality floors; see `digits_split_indices`).
  The pixels, 0..16 in the original, are scaled to 0..255; the tiny size
  makes it a dataset for tests and smoke runs, which ships with scikit-learn.
  """
  rows = digits_split_indices(split)
  # Imported here: scikit-learn takes seconds to import, and only this
  # source needs it.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  return ArraySource(images=images[rows], labels=digits.target[rows])


def tfds_source(name: str, split: str) -> Sequence[dict[str, Any]]:
  """The random-access (ArrayRecord) source of a TFDS dataset.

  Records carry the dataset's features, e.g. {"image", "label", "id"}; the
  data is prepared (downloaded) on first use unless it already is.
  """
  try:
    return tfds.data_source(name, split=split)
  except tfds.core.DatasetNotFoundError as error:
    first_line = str(error).splitlines()[0]
    raise ValueError(f"unknown TFDS dataset '{name}': {first_line}") from error


class FolderSource:
  """The image files under a directory, found recursively, decoded by Pillow.

  Files are sorted by their path relative to the root, so that the index of
  each image (and hence shuffles, shards and resumed positions) does not
  depend on the file system's listing order. Every image is converted to RGB
  (palette and alpha dropped); records carry label 0.
  """

  def __init__(self, root: str):
    self.root = pathlib.Path(root)
    if not self.root.exists():
      raise FileNotFoundError(f"data folder '{root}' does not exist")
    if not self.root.is_dir():
      raise NotADirectoryError(f"data folder '{root}' is not a directory")
    self.files = sorted(
        path.relative_to(self.root)
        for path in self.root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not self.files:
      raise ValueError(
          f"data folder '{root}' holds no image files {IMAGE_SUFFIXES}"
      )

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
    path = self.root / self.files[index]
    try:
      with Image.open(path) as image:
        pixels_HxWx3 = np.asarray(image.convert("RGB"))
    except _DECODE_ERRORS as error:
      raise ValueError(f"cannot read image file '{path}': {error}") from error
    return {"image": pixels_HxWx3, "label": 0}


# Builds each source named in `config.SOURCES` from the config.
_BUILDERS = {
    "digits": lambda config: digits_source(config.split),
    "tfds": lambda config: tfds_source(config.name, config.split),
    "folder": lambda config: FolderSource(config.path),
}


def make_source(config: DataConfig) -> Sequence[dict[str, Any]]:
  """Builds the source named by `config.source`."""
  if config.source not in _BUILDERS:
    raise ValueError(
        f"unknown data source '{config.source}'; known: {sorted(_BUILDERS)}"
    )
  return _BUILDERS[config.source](config)
