"""Images at the edges of the library: [-1, 1] floats to uint8, and PNG grids (Pillow)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from diffusion_jax import files


def to_uint8(images) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 in [0, 255], rounded to the nearest level, any shape."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid_columns(num_images: int) -> int:
  """The columns of a grid of `num_images` by default: ceil(sqrt(N))."""
  return math.ceil(math.sqrt(num_images))


def make_image_grid(images: np.ndarray, ncols: int | None = None, padding: int = 2) -> np.ndarray:
  """Tiles uint8 [N, H, W, C] into one [rows*(H+p)+p, ncols*(W+p)+p, C] image, row by row.

  ncols defaults to ceil(sqrt(N)); the padding and unused cells are black.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(
      f"Expected uint8 images [N, H, W, C] with C in (1, 3, 4), got {images.dtype} {images.shape}."
    )
  n, h, w, c = images.shape
  ncols = ncols or grid_columns(n)
  nrows = math.ceil(n / ncols)
  grid = np.zeros((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), np.uint8)
  for k, image in enumerate(images):
    top, left = padding + (k // ncols) * (h + padding), padding + (k % ncols) * (w + padding)
    grid[top : top + h, left : left + w] = image
  return grid


def enlarge(images: np.ndarray, min_size: int) -> np.ndarray:
  """Repeats the pixels of [N, H, W, C] images by the least integer factor making H, W >= min_size."""
  factor = max(1, math.ceil(min_size / min(images.shape[1:3])))
  return images.repeat(factor, axis=1).repeat(factor, axis=2)


def encode_png(image: np.ndarray) -> bytes:
  """The PNG file of one uint8 image, [H, W] or [H, W, C] with C in 1, 3, 4."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def save_png(image: np.ndarray, path: files.PathLike) -> None:
  """Writes one uint8 image ([H, W] or [H, W, C]) as a PNG file at `path`, atomically."""
  files.write_bytes(path, encode_png(image))


def save_image_grid(
  images: np.ndarray,
  path: files.PathLike,
  ncols: int | None = None,
  padding: int = 2,
  min_size: int = 0,
) -> None:
  """Writes uint8 [N, H, W, C] images as one PNG grid (see `make_image_grid`).

  Images smaller than `min_size` pixels are enlarged (nearest neighbour) so
  that small samples, such as 8x8 digits, can be seen.
  """
  save_png(make_image_grid(enlarge(np.asarray(images), min_size), ncols, padding), path)


# Pillow's modes of 16-bit gray pixels (TIFF and PNG; "I" is 32-bit, checked to hold 16).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8_bit(image: Image.Image, path: files.PathLike) -> Image.Image:
  """`image` with 8 bits per channel, scaled by its bit depth (Pillow would clip 16 bits to 255).

  16-bit gray (common in microscopy) becomes "L" with v8 = round(v16 * 255 / 65535),
  so 0 -> 0, 65535 -> 255 and mid-gray stays mid-gray; a 32-bit "I" image
  is read so when its values fit in 16 bits. 8-bit modes are returned as
  they are (palette, gray, RGB, ...: the caller converts them).

  Raises:
    ValueError: naming `path`, for float pixels or integers beyond 16 bits, which
      have no one 8-bit reading.
  """
  if image.mode == "F":
    raise ValueError(
      f"image file '{path}' holds 32-bit float pixels: save it with 8 or 16 bits per channel"
    )
  if image.mode not in _SIXTEEN_BIT_MODES:
    return image
  pixels = np.asarray(image).astype(np.int64)
  if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
    raise ValueError(
      f"image file '{path}' holds 32-bit integer pixels outside 0..65535: save it"
      " with 8 or 16 bits per channel"
    )
  return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), mode="L")
