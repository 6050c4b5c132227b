"""Random-access sources of training images.

A source is a sequence (`len(source)`, `source[i]`) of records
`{"image": uint8 [H, W, C], "label": int}`; the label may be missing
(unconditional datasets). Sizes and channel counts may differ between records:
`transforms.Preprocess` brings them to one shape. Random access is what lets
grain shuffle globally, shard by process and resume from a recorded position.
"""

from __future__ import annotations

import dataclasses
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from diffusion_jax import files
from diffusion_jax import images as image_utils
from diffusion_jax.config.data import DataConfig

# File suffixes (lower case) of the image files that folders of images are read for (TIFF:
# microscopy's 16-bit gray, scaled by `images.to_8_bit`).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

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


class DatasetUnavailableError(Exception):
  """A TFDS dataset that cannot be read or prepared here; the message says what to do."""


# How long the check that a dataset's download server answers may wait, in seconds.
_PROBE_TIMEOUT_S = 10


def tfds_source(name: str, split: str, data_dir: str | None = None) -> Sequence[dict[str, Any]]:
  """The random-access (ArrayRecord) source of a TFDS dataset in `data_dir`.

  Records carry the dataset's features, e.g. {"image", "label", "id"}. A
  dataset not prepared yet is downloaded and written as ArrayRecord files
  first, where that can work: its download server answers, its manual
  download (if it needs one) is in place, and one process runs. Otherwise
  `DatasetUnavailableError` names the dataset, the data directory and the
  command that prepares it, at once rather than after minutes of retries.
  `data_dir` defaults to TFDS's: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  """
  # Imported here: TFDS takes seconds to import and pulls in TensorFlow when it
  # prepares data; sampling, conversion and evaluating a samples file never read it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as error:
    raise ValueError(f"unknown TFDS dataset '{name}': {_first_line(error)}") from error
  # Loading comes first, so that a dataset mocked by `tfds.testing.mock_data`
  # (loadable, never prepared) is read as TFDS's own `data_source` reads it.
  try:
    return builder.as_data_source(split=split)
  except (KeyError, NotImplementedError) as error:  # TFDS: no splits yet, or no random access
    if _is_prepared(builder):
      if isinstance(error, KeyError):
        raise
      raise DatasetUnavailableError(_no_random_access(builder, name)) from error
  _check_can_prepare(builder, name)
  try:
    builder.download_and_prepare(file_format="array_record")
  except (OSError, tfds.download.DownloadError) as error:
    raise DatasetUnavailableError(
      f"{_not_prepared(builder, name)}, and preparing it failed ({_first_line(error)}):"
      f" {_how_to_prepare(builder, name)}"
    ) from error
  return builder.as_data_source(split=split)


def _no_random_access(builder, name: str) -> str:
  return (
    f"TFDS dataset '{name}' in {builder.data_path} is stored as"
    f" {builder.info.file_format.value} files, which cannot be read by index: write it"
    f" again as ArrayRecord with `{_build_command(builder, name)} --overwrite`"
  )


def _is_prepared(builder) -> bool:
  # is_prepared() logs a warning for a missing folder: a first use is not worth one.
  return builder.data_path.exists() and builder.is_prepared()


def _check_can_prepare(builder, name: str) -> None:
  """Raises DatasetUnavailableError where `builder.download_and_prepare()` cannot work."""
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual_dir = builder.data_dir_root / "downloads" / "manual"
    if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
      instructions = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
      raise DatasetUnavailableError(
        f"{_not_prepared(builder, name)}, and it needs a manual download into {manual_dir}:"
        f" {instructions} Then run `{_build_command(builder, name)}`."
      )
  if unreachable := _unreachable(builder.url_infos or {}):
    raise DatasetUnavailableError(
      f"{_not_prepared(builder, name)}, and it cannot be downloaded from here ({unreachable}):"
      f" {_how_to_prepare(builder, name)}"
    )
  if jax.process_count() > 1:
    raise DatasetUnavailableError(
      f"{_not_prepared(builder, name)}; prepare it once before a multi-process run, so that"
      f" the processes do not race to write it: `{_build_command(builder, name)}`."
    )


def _unreachable(urls: Iterable[str]) -> str | None:
  """'URL: reason' for the first server among `urls` that does not answer; None if all do.

  One HEAD request per host, through the proxies the environment names now
  (`urllib.request.urlopen`'s shared opener keeps those of its first use), so
  that an offline machine fails at once instead of after TFDS's minutes of
  download retries.
  """
  opener = urllib.request.build_opener()
  probed = set()
  for url in urls:
    host = urllib.parse.urlsplit(url).netloc
    if host in probed:
      continue
    probed.add(host)
    try:
      opener.open(urllib.request.Request(url, method="HEAD"), timeout=_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
      pass  # the server answered; TFDS's download reports what it said
    except OSError as error:  # URLError (no such host, refused), timeouts
      return f"{url}: {getattr(error, 'reason', error)}"
  return None


def _not_prepared(builder, name: str) -> str:
  return f"TFDS dataset '{name}' is not prepared in {builder.data_dir_root}"


def _build_command(builder, name: str) -> str:
  return f"tfds build {name} --file_format=array_record --data_dir={builder.data_dir_root}"


def _how_to_prepare(builder, name: str) -> str:
  return (
    f"prepare it with `{_build_command(builder, name)}` (on a machine that can download"
    f" it, then copy {builder.data_dir_root / builder.name} here), or point $TFDS_DATA_DIR"
    " at a directory that holds it."
  )


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


class FolderSource:
  """The image files under a directory (local or gs://), found recursively, decoded by Pillow.

  Files are sorted by their path relative to the root, so that the index of
  each image (and hence shuffles, shards and resumed positions) does not
  depend on the file system's listing order. Every image is converted to RGB
  (palette and alpha dropped; 16-bit gray scaled to 8 bits, `images.to_8_bit`);
  records carry label 0.
  """

  def __init__(self, root: str):
    self.root = root
    if not files.exists(root):
      raise FileNotFoundError(f"data folder '{root}' does not exist")
    if not files.is_dir(root):
      raise NotADirectoryError(f"data folder '{root}' is not a directory")
    self.files = files.find_files(root, IMAGE_SUFFIXES)
    if not self.files:
      raise ValueError(f"data folder '{root}' holds no image files {IMAGE_SUFFIXES}")

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
    path = files.join(self.root, self.files[index])
    pixels_HxWx3 = np.asarray(image_utils.to_8_bit(open_image(path), path).convert("RGB"))
    return {"image": pixels_HxWx3, "label": 0}


def open_image(path: str) -> Image.Image:
  """The image file at `path` (local or gs://), decoded by Pillow.

  Raises:
    ValueError: naming the file, when it is unreadable, truncated, corrupted or
      larger than Pillow's decompression-bomb limit.
  """
  try:
    with files.open_for_read(path) as f:
      image = Image.open(f)
      image.load()
    return image
  except _DECODE_ERRORS as error:
    raise ValueError(f"cannot read image file '{path}': {error}") from error


# Builds each source named in `config.SOURCES` from the config.
_BUILDERS = {
  "digits": lambda config: digits_source(config.split),
  "tfds": lambda config: tfds_source(config.name, config.split),
  "folder": lambda config: FolderSource(config.path),
}


def make_source(config: DataConfig) -> Sequence[dict[str, Any]]:
  """Builds the source named by `config.source`."""
  if config.source not in _BUILDERS:
    raise ValueError(f"unknown data source '{config.source}'; known: {sorted(_BUILDERS)}")
  return _BUILDERS[config.source](config)
