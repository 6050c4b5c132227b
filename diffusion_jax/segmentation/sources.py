"""Random-access sources of image/mask pairs: synthetic cells, TFDS, folders of files.

A source is a sequence of records {"image": uint8 [H, W, C], "mask": int32
[H, W] of class labels 0..num_classes-1}. Every record is checked as it is
read: an image and mask of different sizes, a mask that is not one channel
of class indices (RGB), or a label outside the classes, is a ValueError
naming the file (or the dataset record).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from diffusion_jax import files
from diffusion_jax import images as image_utils
from diffusion_jax.data import sources as data_sources
from diffusion_jax.segmentation import synthetic

# Pillow modes of one channel of integers: bilevel, 8-bit gray, palette, 16- and 32-bit gray.
_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")


def check_pair(image: np.ndarray, mask: np.ndarray, num_classes: int, where: str) -> None:
  """Raises a ValueError naming `where` unless mask [H, W] fits image [H, W, C] and the classes."""
  if image.shape[:2] != mask.shape:
    raise ValueError(
      f"{where}: the image is {image.shape[0]}x{image.shape[1]} pixels but its mask"
      f" is {mask.shape[0]}x{mask.shape[1]}"
    )
  bad = np.unique(mask[(mask < 0) | (mask >= num_classes)])
  if bad.size:
    raise ValueError(
      f"{where}: mask labels {bad[:8].tolist()} are outside the {num_classes}"
      f" classes 0..{num_classes - 1}"
    )


class CheckedSource:
  """Wraps records {image, mask} from `read(index)`: masks shifted by `offset`, then checked."""

  def __init__(self, read, length: int, describe, num_classes: int, offset: int = 0):
    self._read, self._length, self._describe = read, length, describe
    self.num_classes, self.offset = num_classes, offset

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    image, mask = self._read(index)
    image = np.asarray(image)
    image = image[..., None] if image.ndim == 2 else image
    mask = np.asarray(mask).astype(np.int32)
    if mask.ndim == 3 and mask.shape[-1] != 1:
      raise ValueError(
        f"{self._describe(index)}: the mask has {mask.shape[-1]} channels; masks"
        " must be one channel of class indices"
      )
    mask = mask[..., 0] if mask.ndim == 3 else mask
    mask = mask - self.offset
    check_pair(image, mask, self.num_classes, self._describe(index))
    return {"image": image, "mask": mask}


def cells_source(seed: int, split: str, num_images: int, size: int, num_classes: int):
  """`num_images` synthetic cell images of `split` ("train" or "test"), drawn on first use."""
  cells = synthetic.CellsSource(seed, split, num_images, size)

  def read(index):
    record = cells[index]
    return record["image"], record["mask"]

  return CheckedSource(read, len(cells), lambda i: f"synthetic cells {split}[{i}]", num_classes)


def tfds_source(
  name: str, split: str, image_key: str, mask_key: str, num_classes: int, offset: int
) -> CheckedSource:
  """A TFDS dataset's (image, mask) features read by random access (ArrayRecord files).

  Found or prepared as the diffusion task's TFDS data are (`data.sources.tfds_source`: a
  dataset that cannot be prepared here is one error naming the command that prepares it).
  """
  records: Sequence[dict[str, Any]] = data_sources.tfds_source(name, split)

  def read(index):
    record = records[index]
    for key in (image_key, mask_key):
      if key not in record:
        raise KeyError(f"TFDS {name}/{split} has no feature '{key}'; it has {sorted(record)}")
    return record[image_key], record[mask_key]

  def describe(index):
    file_name = records[index].get("file_name")
    return f"TFDS {name}/{split}[{index}]" + (f" ({file_name!r})" if file_name is not None else "")

  return CheckedSource(read, len(records), describe, num_classes, offset)


def _files(directory: str) -> dict[str, str]:
  """{relative path without suffix: path} of the image files under `directory`."""
  return {
    os.path.splitext(name)[0]: files.join(directory, name)
    for name in files.find_files(directory, data_sources.IMAGE_SUFFIXES)
  }


def folder_pairs(root: str) -> list[tuple[str, str]]:
  """(image, mask) paths: ROOT/images/NAME.* with ROOT/masks/NAME.* (any image suffix each).

  Raises:
    FileNotFoundError: a missing folder, or an image without a mask (named).
  """
  images_dir, masks_dir = files.join(root, "images"), files.join(root, "masks")
  for directory in (images_dir, masks_dir):
    if not files.is_dir(directory):
      raise FileNotFoundError(
        f"segmentation folder '{root}' needs '{directory}' (image/mask"
        " pairs: images/NAME.png with masks/NAME.png)"
      )
  images, masks = _files(images_dir), _files(masks_dir)
  if not images:
    raise FileNotFoundError(f"'{images_dir}' holds no image files {data_sources.IMAGE_SUFFIXES}")
  if missing := sorted(set(images) - set(masks)):
    raise FileNotFoundError(
      f"no mask in '{masks_dir}' for image '{images[missing[0]]}'"
      f" ({len(missing)} image(s) without one)"
    )
  return [(images[key], masks[key]) for key in images]


def read_image(path: str) -> np.ndarray:
  """uint8 [H, W] (gray) or [H, W, 3] pixels of an image file; a ValueError names an unreadable one.

  16-bit gray is scaled to 8 bits (`images.to_8_bit`); palette and other modes become RGB.
  """
  with data_sources.open_image(path) as image:
    image = image_utils.to_8_bit(image, path)
    return np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))


def read_mask(path: str) -> np.ndarray:
  """Class indices [H, W] of a mask file: gray (8 or 16 bits, values as they are) or palette.

  Raises:
    ValueError: naming the file, when it is unreadable or not one channel (RGB, gray + alpha):
      colours are not class indices.
  """
  with data_sources.open_image(path) as image:
    if image.mode not in _MASK_MODES:
      raise ValueError(
        f"mask file '{path}' is {image.mode}; masks must be one channel of class"
        f" indices (a gray or palette image: mode {', '.join(_MASK_MODES)})"
      )
    return np.asarray(image)


def folder_source(root: str, num_classes: int) -> CheckedSource:
  """Image/mask pairs under ROOT/images and ROOT/masks; masks hold class indices 0..K-1."""
  pairs = folder_pairs(root)

  def read(index):
    image_path, mask_path = pairs[index]
    return read_image(image_path), read_mask(mask_path)

  def describe(index):
    return f"image '{pairs[index][0]}' with mask '{pairs[index][1]}'"

  return CheckedSource(read, len(pairs), describe, num_classes)


def prepare_image(image: np.ndarray, mask: np.ndarray, num_channels: int, resize: int = 0):
  """(float32 [H, W, C] in [0, 1] with `num_channels`, int32 mask [H, W]).

  Gray images are repeated to RGB, RGB converted to luma for 1 channel; with
  `resize`, the short side is scaled to `resize` pixels (masks nearest-neighbour).
  """
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  pil = pil.convert({1: "L", 3: "RGB"}[num_channels])
  if resize:
    scale = resize / min(pil.size)
    size = (max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale)))
    pil = pil.resize(size, Image.Resampling.BILINEAR)
    mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize(size, Image.Resampling.NEAREST))
  pixels = np.asarray(pil, np.float32).reshape(pil.size[1], pil.size[0], num_channels) / 255.0
  return pixels, mask.astype(np.int32)
