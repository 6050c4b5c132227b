"""LPIPS with VGG16 (Zhang, Isola, Efros, Shechtman & Wang, CVPR 2018), in Flax: `lpips.LPIPS(net="vgg")`.

The learned perceptual distance of two images x, y (eq. 1):

    d(x, y) = sum_l 1 / (H_l W_l) sum_{h, w} || w_l * (y^l_hw - x^l_hw) ||_2^2,

with x^l the VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3 [N, H_l, W_l, C_l], each unit-normalised over its C_l channels, and
w_l [C_l] the non-negative weights of a 1x1 linear layer (`lin0` ... `lin4`)
trained on human judgements; as in the `lpips` package (version 0.1), the
inputs in [-1, 1] first pass its scaling layer, (x - SHIFT) / SCALE, which is
ImageNet's normalisation of (x + 1) / 2. Layout NHWC.

Consistency distillation uses it as its metric (Song et al. 2023, CM):
`distance` resizes both images to RESOLUTION x RESOLUTION with
`jax.image.resize(..., "bilinear")` first, as CM's CIFAR-10 code does
(openai/consistency_models_cifar10, jcm/losses.py: 32 -> 224 before its Flax LPIPS).

The weights are the user's torch files, read by `load_lpips` without torch:
the `lpips` package's `weights/v0.1/vgg.pth` (the linear layers) with
torchvision's vgg16 state dict (`features.*`), or one state dict of the whole
`LPIPS(net="vgg")` (`net.slice*`, `lin*`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import torch_layouts, weightfiles

SHIFT = (-0.030, -0.088, -0.188)  # lpips' ScalingLayer, per RGB channel
SCALE = (0.458, 0.448, 0.450)
# VGG16's 3x3 convolutions up to relu5_3, by their index in torchvision's vgg16().features,
# in the five stages that end at the features LPIPS compares (each stage after the first
# starts with a 2x2 max pool); lpips' `net.slice{s}` holds stage s's.
STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
CHANNELS = (64, 128, 256, 512, 512)
RESOLUTION = 224  # CM's images reach LPIPS at 224 x 224
EPS = 1e-10  # lpips' normalize_tensor
_STAGE_OF = {index: stage for stage, indices in enumerate(STAGES, 1) for index in indices}
# Keys of the files that hold no weights of the network: torchvision's classifier, lpips'
# scaling layer (its constants are SHIFT and SCALE) and `lins`, a second name of lin0-lin4.
_UNUSED_KEYS = re.compile(r"classifier\..*|scaling_layer\.(shift|scale)|lins\.\d\.model\.1\.weight")
_TORCHVISION_KEY = re.compile(r"features\.(\d+)\.(weight|bias)")


def unit_normalize(features_NxHxWxC: jax.Array) -> jax.Array:
  """Each pixel's feature vector divided by its L2 norm (+ EPS), as lpips' normalize_tensor.

  The same values; the gradient is finite (zero) where a pixel's features are
  all zero, as ReLU features can be, where sqrt's at 0 is not.
  """
  squared = jnp.sum(jnp.square(features_NxHxWxC), axis=-1, keepdims=True)
  positive = squared > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return features_NxHxWxC / (norm + EPS)


class VGG16Features(nn.Module):
  """VGG16's convolutions (3x3, padding 1, ReLU) up to relu5_3: [N, H, W, 3] -> the five stages' outputs.

  Output l is [N, H / 2^l, W / 2^l, CHANNELS[l]] (floor division, as torch's max pool).
  The convolutions are named `features_{i}` after torchvision's indices.
  """

  @nn.compact
  def __call__(self, x_NxHxWx3: jax.Array) -> list[jax.Array]:
    x, outputs = x_NxHxWx3, []
    for stage, (indices, channels) in enumerate(zip(STAGES, CHANNELS)):
      if stage:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for index in indices:
        x = nn.relu(
          nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), name=f"features_{index}")(x)
        )
      outputs.append(x)
    return outputs


class LPIPS(nn.Module):
  """d(x, y) of eq. 1 (module docstring): x, y [N, H, W, 3] in [-1, 1] -> [N]; H, W >= 16."""

  @nn.compact
  def __call__(self, x_NxHxWx3: jax.Array, y_NxHxWx3: jax.Array) -> jax.Array:
    vgg = VGG16Features(name="net")
    scale = lambda images: (images - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    distance_N = 0.0
    for layer, (x, y) in enumerate(zip(vgg(scale(x_NxHxWx3)), vgg(scale(y_NxHxWx3)))):
      squared_NxHxWxC = jnp.square(unit_normalize(x) - unit_normalize(y))
      weighted_NxHxWx1 = nn.Dense(1, use_bias=False, name=f"lin{layer}")(squared_NxHxWxC)
      distance_N = distance_N + jnp.mean(weighted_NxHxWx1, axis=(1, 2, 3))
    return distance_N


def distance(
  variables, x_NxHxWxC: jax.Array, y_NxHxWxC: jax.Array, resolution: int = RESOLUTION
) -> jax.Array:
  """Pure and jittable: LPIPS [N] of images [N, H, W, 1|3] in [-1, 1], as CM's code measures it.

  Both batches are resized to [N, resolution, resolution, C] (bilinear,
  `jax.image.resize`, as jcm/losses.py), grayscale repeated to three equal
  channels, then compared by `LPIPS`. `variables` from `load_lpips`.
  """

  def prepare(images):
    images = jax.image.resize(
      images, (images.shape[0], resolution, resolution, images.shape[-1]), "bilinear"
    )
    return jnp.broadcast_to(images, (*images.shape[:3], 3))

  return LPIPS().apply(variables, prepare(x_NxHxWxC), prepare(y_NxHxWxC))


# ----------------------------------------------------------------------------- weights


@functools.cache
def _abstract_variables() -> dict:
  """{path tuple: ShapeDtypeStruct} of the network's variables, e.g. ("params", "lin0", "kernel")."""
  image = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  return traverse_util.flatten_dict(jax.eval_shape(LPIPS().init, jax.random.key(0), image, image))


def _target(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, torch_layouts.Target]:
  """(lpips' state-dict key, target) of a leaf: net/features_{i}/kernel -> net.slice{s}.{i}.weight
  (OIHW -> HWIO), net/features_{i}/bias -> ...bias, lin{l}/kernel [C, 1] -> lin{l}.model.1.weight
  [1, C, 1, 1]."""
  _, module, *rest, leaf = path
  if module.startswith("lin"):
    return f"{module}.model.1.weight", (path, shape, torch_layouts.dense(1, trailing=2))
  index = int(rest[0].removeprefix("features_"))
  if leaf == "kernel":
    return f"net.slice{_STAGE_OF[index]}.{index}.weight", (path, shape, torch_layouts.CONV)
  return f"net.slice{_STAGE_OF[index]}.{index}.bias", (path, shape, torch_layouts.SAME)


def _lpips_key(key: str) -> str:
  """lpips' name of a state-dict key: torchvision's features.{i}.* -> net.slice{s}.{i}.*."""
  match = _TORCHVISION_KEY.fullmatch(key)
  if match and int(match[1]) in _STAGE_OF:
    return f"net.slice{_STAGE_OF[int(match[1])]}.{key.removeprefix('features.')}"
  return key


def params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """The network's variables {"params": ...} from lpips' or torchvision's torch names.

  Keys may be lpips' (`net.slice3.10.weight`, `lin2.model.1.weight`) or
  torchvision's (`features.10.weight`); torchvision's classifier, lpips'
  scaling layer and its `lins.*` aliases are ignored.

  Raises:
    ValueError: one line naming the missing, unexpected and mis-shaped keys (lpips' names).
  """
  targets = dict(_target(path, leaf.shape) for path, leaf in _abstract_variables().items())
  given = {_lpips_key(k): v for k, v in state_dict.items() if not _UNUSED_KEYS.fullmatch(k)}
  leaves = torch_layouts.flax_leaves(targets, given)
  return traverse_util.unflatten_dict({path: jnp.asarray(leaf) for path, leaf in leaves.items()})


def load_lpips(*paths: str | os.PathLike) -> dict:
  """The network's variables from torch weight files, e.g. lpips' vgg.pth and torchvision's vgg16.

  The files' state dicts together must hold the network's weights once: the
  `lpips` package's `weights/v0.1/vgg.pth` (lin0-lin4) with torchvision's
  vgg16 state dict (`vgg16-397923af.pth`), or `LPIPS(net="vgg").state_dict()`
  saved alone. Read with `weightfiles.load` (no torch, no pickled code run).

  Raises:
    files.PathNotFoundError: a file does not exist (it names the path).
    weightfiles.WeightFileError: a file cannot be read (it names the path).
    ValueError: one line naming the paths and the keys that are missing,
      unexpected, mis-shaped or in two files.
  """
  named = ", ".join(os.fspath(p) for p in paths)
  state_dict = {}
  for path in paths:
    for key, value in weightfiles.load(path).items():
      if key in state_dict:
        raise ValueError(f"{named}: key {weightfiles.quote(key)} is in two of the files.")
      state_dict[key] = value
  try:
    return params_from_state_dict(state_dict)
  except ValueError as e:
    raise ValueError(f"{named}: not the weights of lpips' LPIPS(net='vgg'): {e}") from e
