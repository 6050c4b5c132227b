"""Per-record and per-batch transforms of the input pipeline.

Records enter as `{"image": uint8 [H, W, C], "label": int}` from any source
and leave `Preprocess` as uint8 [S, S, C'] with an int32 label; batches leave
`to_model_range` as float32 images in [-1, 1] (DDPM, Ho et al. 2020, Sec. 3.3).
"""

import dataclasses

import grain
import numpy as np
from PIL import Image, ImageOps

# Pillow's bicubic filter, antialiased when shrinking. Also used to enlarge
# small images (the 8x8 digits), where it gives smooth strokes.
RESAMPLE = Image.Resampling.BICUBIC

_MODES = {1: "L", 3: "RGB"}


def _to_pil(image_HxWxC: np.ndarray) -> Image.Image:
  """A uint8 [H, W, 1] or [H, W, 3] array as a Pillow image ("L" or "RGB")."""
  channels = image_HxWxC.shape[-1]
  if channels not in _MODES:
    raise ValueError(f"images must have 1 or 3 channels, got shape {image_HxWxC.shape}")
  return Image.fromarray(image_HxWxC[..., 0] if channels == 1 else image_HxWxC)


def resize_and_center_crop(image_HxWxC: np.ndarray, size: int, num_channels: int) -> np.ndarray:
  """Converts channels, scales the short side to `size`, crops the centre.

  Args:
    image_HxWxC: uint8 [H, W, 1 or 3].
    size: output height = width.
    num_channels: 1 (RGB is converted to ITU-R 601 luma) or 3 (grayscale is
      repeated).

  Returns:
    uint8 [size, size, num_channels]; the input itself when it already has
    this shape.
  """
  if image_HxWxC.shape == (size, size, num_channels):
    return image_HxWxC
  image = _to_pil(image_HxWxC).convert(_MODES[num_channels])
  if image.size != (size, size):
    # Crops the central region of the target's aspect ratio, then resizes it:
    # the same pixels as resizing the short side and centre-cropping.
    image = ImageOps.fit(image, (size, size), method=RESAMPLE)
  return np.asarray(image).reshape(size, size, num_channels)


@dataclasses.dataclass(frozen=True)
class Preprocess(grain.transforms.Map):
  """Brings a source record to uint8 [size, size, num_channels] and int32."""

  size: int
  num_channels: int

  def map(self, record):
    if "image" not in record:
      raise KeyError(f"record has no 'image' feature; it has {sorted(record)}")
    image = resize_and_center_crop(np.asarray(record["image"]), self.size, self.num_channels)
    return {"image": image, "label": np.int32(record.get("label", 0))}


class RandomHorizontalFlip(grain.transforms.RandomMap):
  """Mirrors the image left-right with probability 1/2.

  grain seeds `rng` from the pipeline seed and the record's position, so the
  flips are the same on every run and change from epoch to epoch.
  """

  def random_map(self, record, rng: np.random.Generator):
    if rng.random() < 0.5:
      record = {**record, "image": record["image"][:, ::-1]}
    return record


def to_model_range(batch):
  """uint8 images [B, H, W, C] to float32 in [-1, 1] (x / 127.5 - 1)."""
  image = batch["image"].astype(np.float32) / 127.5 - 1.0
  return {"image": image, "label": batch["label"].astype(np.int32)}
