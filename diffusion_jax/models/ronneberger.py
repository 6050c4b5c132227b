"""The classic U-Net: Ronneberger, Fischer & Brox 2015, "U-Net: Convolutional
Networks for Biomedical Image Segmentation" (Sec. 2 and Fig. 1).

Contracting path: per level two unpadded 3x3 convs + ReLU, then 2x2 max
pooling with stride 2; channels double at each level (64 .. 1024). Expansive
path: a 2x2 up-convolution halving the channels, concatenation with the
centre crop of the matching contracting feature map, two 3x3 convs + ReLU.
A final 1x1 conv maps to the classes: 23 conv layers in all. A 572x572 input
gives a 388x388 segmentation map. Weights start Gaussian with standard
deviation sqrt(2 / N), N the incoming connections of a unit (Sec. 3).
"""

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.config.models import RonnebergerSettings


def he_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """N(0, 2 / N) for a conv kernel [kh, kw, in, out], N = kh * kw * in (Sec. 3).

  N counts a unit's incoming connections, e.g. 576 for a 3x3 conv on 64
  channels. A plain Gaussian, as the paper says, not a truncated one.
  """
  incoming = math.prod(shape[:-1])
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / incoming).astype(dtype)


def he_normal_upconv(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """N(0, 2 / N) for a 2x2 stride-2 up-convolution [2, 2, in, out]: N = in.

  Each output unit of a stride-2 2x2 up-convolution sees one input pixel.
  """
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / shape[-2]).astype(dtype)


def center_crop(x_BxHxWxC: jax.Array, height: int, width: int) -> jax.Array:
  """The central [height, width] window of x ("copy and crop", Fig. 1)."""
  top = (x_BxHxWxC.shape[1] - height) // 2
  left = (x_BxHxWxC.shape[2] - width) // 2
  return x_BxHxWxC[:, top : top + height, left : left + width, :]


def valid_output_size(size: int, depth: int = 4) -> int:
  """Side length of the unpadded U-Net's output for an input side `size`.

  Each unpadded 3x3 conv pair removes 4 pixels; every 2x2 pooling must see an
  even size (paper Sec. 3), so only some sizes are valid, e.g. 572 -> 388.

  Raises:
    ValueError: if `size` leads to an odd size before a pooling, or to none.
  """
  side = size
  for level in range(depth):
    side -= 4
    if side <= 0 or side % 2:
      raise ValueError(
        f"input side {size} gives an odd or empty feature map ({side}) before pooling {level}; "
        f"valid sides are {2**depth} * k + {4 * (2 ** (depth + 1) - 1)}, e.g. 572"
      )
    side //= 2
  side -= 4
  for _ in range(depth):
    side = 2 * side - 4
  if side <= 0:
    raise ValueError(f"input side {size} is too small for a U-Net of depth {depth}")
  return side


class ConvBlock(nn.Module):
  """Two 3x3 convolutions, each followed by a ReLU, [B, H, W, C] -> [B, H', W', features]."""

  features: int
  padding: Literal["VALID", "SAME"] = "VALID"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(2):
      x = nn.relu(
        nn.Conv(
          self.features, (3, 3), padding=self.padding, kernel_init=he_normal, name=f"conv{i}"
        )(x)
      )
    return x


class RonnebergerUNet(RonnebergerSettings, nn.Module):
  """Segmentation U-Net, [B, H, W, C] -> [B, H', W', num_classes] logits.

  Attributes:
    num_classes: output channels of the final 1x1 conv (2 in the paper).
    features: channels of the first level, doubled at each of the `depth`
      poolings (64 -> 1024 in the paper).
    depth: number of 2x2 poolings (4 in the paper).
    padding: "VALID" for the paper's unpadded convs (H' = valid_output_size(H),
      e.g. 572 -> 388); "SAME" keeps H' = H for any H divisible by 2**depth.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits for images x [B, H, W, C]."""
    self._check_input(x)
    skips = []
    h = x
    for level in range(self.depth):
      h = ConvBlock(self.features * 2**level, self.padding, name=f"down{level}")(h)
      skips.append(h)
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = ConvBlock(self.features * 2**self.depth, self.padding, name="bottom")(h)
    for level in reversed(range(self.depth)):
      features = self.features * 2**level
      h = nn.ConvTranspose(
        features, (2, 2), strides=(2, 2), kernel_init=he_normal_upconv, name=f"up{level}_upconv"
      )(h)
      skip = center_crop(skips.pop(), h.shape[1], h.shape[2])
      h = ConvBlock(features, self.padding, name=f"up{level}")(jnp.concatenate([skip, h], axis=-1))
    return nn.Conv(self.num_classes, (1, 1), kernel_init=he_normal, name="classifier")(h)

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim != 4:
      raise ValueError(f"RonnebergerUNet expects NHWC images, got shape {x.shape}")
    for side in x.shape[1:3]:
      if self.padding == "VALID":
        valid_output_size(side, self.depth)
      elif side % 2**self.depth:
        raise ValueError(
          f"with padding='SAME' H and W must be divisible by {2**self.depth}, got {side}"
        )
