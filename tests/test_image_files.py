"""Image files are read without silent changes: 16-bit pixels scaled, colour masks refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import images
from diffusion_jax.data import sources as data_sources
from diffusion_jax.segmentation import sources as seg_sources

# 16-bit gray levels and their 8-bit readings, round(v * 255 / 65535).
SIXTEEN_BIT = np.array([[0, 128, 257, 1000], [32767, 32768, 65280, 65535]], np.uint16)
EIGHT_BIT = np.array([[0, 0, 1, 4], [127, 128, 254, 255]], np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_gray_is_scaled_by_its_bit_depth(tmp_path, suffix):
  path = tmp_path / f"cells{suffix}"
  Image.fromarray(SIXTEEN_BIT).save(path)  # mode I;16, as microscopes write them
  assert Image.open(path).mode == "I;16"
  np.testing.assert_array_equal(seg_sources.read_image(path), EIGHT_BIT)


def test_image_folder_scales_sixteen_bit_pngs(tmp_path):
  Image.fromarray(SIXTEEN_BIT).save(tmp_path / "cells.png")
  Image.fromarray(EIGHT_BIT).save(tmp_path / "eight.png")
  source = data_sources.FolderSource(str(tmp_path))
  for index in range(2):  # the 16-bit file reads as its 8-bit twin, in RGB
    np.testing.assert_array_equal(source[index]["image"], np.repeat(EIGHT_BIT[..., None], 3, -1))


@pytest.mark.parametrize(
  "pixels, mode, message",
  [
    (np.ones((2, 2), np.float32), "F", "32-bit float pixels"),
    (np.full((2, 2), 70000, np.int32), "I", "32-bit integer pixels outside 0..65535"),
  ],
)
def test_pixels_without_an_eight_bit_reading_are_refused(tmp_path, pixels, mode, message):
  image = Image.fromarray(pixels, mode=mode)
  with pytest.raises(ValueError, match=f"'{tmp_path / 'x.tif'}' holds {message}"):
    images.to_8_bit(image, tmp_path / "x.tif")


def _folder(tmp_path, mask: Image.Image):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "a.png")
  mask.save(tmp_path / "masks" / "a.png")
  return seg_sources.folder_source(str(tmp_path), num_classes=3)


def test_rgb_mask_is_refused_naming_the_file(tmp_path):
  colours = np.zeros((4, 4, 3), np.uint8)
  colours[1, 1] = (2, 255, 0)  # first channel 2, a valid class on its own: read so on main
  source = _folder(tmp_path, Image.fromarray(colours))
  with pytest.raises(ValueError, match=f"mask file '{tmp_path / 'masks' / 'a.png'}' is RGB"):
    source[0]  # pylint: disable=pointless-statement


@pytest.mark.parametrize("mode", ["L", "P", "I;16"])
def test_gray_palette_and_sixteen_bit_masks_keep_their_indices(tmp_path, mode):
  labels = np.array([[0, 1, 2, 0]] * 4, np.uint8)
  mask = Image.fromarray(labels.astype(np.uint16) if mode == "I;16" else labels)
  if mode == "P":
    mask = mask.convert("L").convert("P")  # indices kept, palette of grays
    mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
  np.testing.assert_array_equal(_folder(tmp_path, mask)[0]["mask"], labels)


def test_multichannel_mask_records_are_refused_naming_the_record():
  source = seg_sources.CheckedSource(
    lambda i: (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)),
    1,
    lambda i: f"TFDS pets/train[{i}]",
    num_classes=2,
  )
  with pytest.raises(ValueError, match=r"TFDS pets/train\[0\]: the mask has 3 channels"):
    source[0]  # pylint: disable=pointless-statement
