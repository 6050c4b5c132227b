"""The Inception-v3 of FID, Inception Score and sFID, in Flax: TF's `inception-2015-12-05` graph.

FID (Heusel et al. 2017), the Inception Score (Salimans et al. 2016) and sFID
(Nash et al. 2021) are all defined on one network, the TensorFlow graph
`inception-2015-12-05`. This is that graph as pytorch-fid re-creates it
(`pytorch_fid.inception.fid_inception_v3`): torchvision's InceptionV3 layout
with 1008 classes, no auxiliary head, and TF's two quirks:
  * the average-pool branches of Mixed_5b-5d, 6b-6e and 7b leave the zero
    padding out of the mean (count_include_pad=False);
  * Mixed_7c's pool branch is a 3x3 max pool.
Every convolution is bias-free and followed by BatchNorm (eps 1e-3, inference
statistics only) and ReLU. Layout NHWC; parameters are one plain pytree named
like the PyTorch state dict (`Mixed_5b.branch_pool.bn.running_var` is
variables["batch_stats"]["Mixed_5b"]["branch_pool"]["bn"]["var"]).

Outputs for uint8 images [N, H, W, 3] (or [N, H, W, 1], repeated to 3 channels):
  pool    [N, 2048]  pool3, the mean of Mixed_7c over space: FID's features.
  logits  [N, 1008]  pool3 @ fc.weight.T WITHOUT fc.bias: the Inception Score's
                     logits, as in openai's IS code (`improved-gan`) and
                     torch-fidelity's "logits_unbiased".
  spatial [N, 2023]  Mixed_6d's first 1x1 branch (after ReLU), first 7 channels,
                     17*17*7 flattened in NHWC order: sFID's features, as in
                     the ADM evaluator (`mixed_6/conv`[..., :7]).

Images reach the network's 299x299 input in one of two ways (`resize=`):
  "tf"           TF1's ResizeBilinear (align_corners=False, half_pixel_centers=
                 False: source = dest * in/out) on the uint8 values, then
                 (u - 128) / 128. Reproduces the published TF numbers (and
                 torch-fidelity's).
  "pytorch-fid"  pytorch-fid's InceptionV3(resize_input=True, normalize_input=True):
                 torch's bilinear interpolate (align_corners=False, half-pixel
                 centres, no antialiasing) of u / 255, then 2x - 1.
`jax.image.resize` implements neither (it always takes half-pixel centres, and
antialiases when downsampling), so the resize here is two interpolation
matrices [out, in], one per axis, built as the two libraries compute their taps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from diffusion_jax import parallel, torch_layouts, weightfiles

# The published weights: TF's graph ported to PyTorch by pytorch-fid; torch-fidelity
# serves the same file under another name. Both names carry torch.hub's hash prefix:
# the file's SHA-256 begins with 6726825d (the full hash is not recorded here).
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URLS = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
  "pt_inception-2015-12-05-6726825d.pth",
  "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
  "weights-inception-2015-12-05-6726825d.pth",
)
WEIGHTS_SHA256_PREFIX = "6726825d"

ResizeMode = Literal["tf", "pytorch-fid"]
RESIZE_MODES = ("tf", "pytorch-fid")
INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_FEATURES = 2048
SPATIAL_CHANNELS = 7
HIGHEST = jax.lax.Precision.HIGHEST  # float32 convolutions and matmuls on TPU, not bf16 passes.


# ----------------------------------------------------------------------------- input


def interpolation_matrix(in_size: int, out_size: int, resize: ResizeMode) -> np.ndarray:
  """Bilinear weights [out_size, in_size]: row o holds the two taps of output pixel o.

  Source coordinates are rounded to float32 as the libraries' CPU kernels round them:
    "tf":          src = o * (in / out)                           (TF1's legacy scaler)
    "pytorch-fid": src = max((o + 0.5) * (in / out) - 0.5, 0)     (half-pixel centres,
                   one rounding: torch's kernel is a fused multiply-add)
  with in / out a float32; taps floor(src) and min(floor(src) + 1, in - 1),
  weights 1 - frac and frac.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  if resize == "tf":
    src = dst * scale
  else:  # the float64 product of two float32s is exact: one rounding, at the end
    src = np.maximum(((dst + 0.5).astype(np.float64) * scale - 0.5).astype(np.float32), 0)
  lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = src - lower.astype(np.float32)
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lower), 1 - frac)
  np.add.at(weights, (rows, upper), frac)
  return weights


def check_images(shape: tuple[int, ...], dtype) -> None:
  """Raises ValueError unless (shape, dtype) is a uint8 batch [N, H, W, 1 or 3]."""
  if len(shape) != 4 or shape[-1] not in (1, 3) or np.dtype(dtype) != np.uint8:
    raise ValueError(
      f"Inception takes uint8 images [N, H, W, 3] (or [N, H, W, 1]); "
      f"got {np.dtype(dtype).name} {tuple(shape)}."
    )


def check_resize(resize: str) -> None:
  if resize not in RESIZE_MODES:
    raise ValueError(f"Unknown Inception resize mode {resize!r}; known: {', '.join(RESIZE_MODES)}.")


def preprocess(images_NxHxWxC: jax.Array, resize: ResizeMode = "tf") -> jax.Array:
  """uint8 images [N, H, W, 1|3] -> the network's input [N, 299, 299, 3] float32 in [-1, 1].

  Grayscale images are repeated to three equal channels, the usual reading of
  one-channel data (e.g. MNIST) by FID code. See the module docstring for the
  two `resize` modes.
  """
  check_images(images_NxHxWxC.shape, images_NxHxWxC.dtype)
  check_resize(resize)
  _, height, width, channels = images_NxHxWxC.shape
  x = jnp.asarray(images_NxHxWxC, jnp.float32)
  if resize == "pytorch-fid":
    x = x / 255
  rows_Yxh = interpolation_matrix(height, INPUT_SIZE, resize)
  cols_Xxw = interpolation_matrix(width, INPUT_SIZE, resize)
  x = jnp.einsum("yh,nhwc->nywc", rows_Yxh, x, precision=HIGHEST)
  x = jnp.einsum("xw,nywc->nyxc", cols_Xxw, x, precision=HIGHEST)
  x = (x - 128) / 128 if resize == "tf" else 2 * x - 1
  return jnp.broadcast_to(x, (*x.shape[:3], 3)) if channels == 1 else x


# ----------------------------------------------------------------------------- network


class BasicConv(nn.Module):
  """Bias-free convolution, BatchNorm (running statistics, eps 1e-3), ReLU: torchvision's BasicConv2d."""

  features: int
  kernel_size: int | tuple[int, int] = 1
  strides: int = 1
  padding: str = "SAME"  # for the stride-1, odd kernels here: torch's symmetric (k - 1) / 2

  @nn.compact
  def __call__(self, x):
    kernel = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else self.kernel_size
    x = nn.Conv(
      self.features,
      kernel,
      self.strides,
      self.padding,
      use_bias=False,
      precision=HIGHEST,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _branch(x, prefix: str, *layers: tuple):
  """BasicConvs named `prefix_1`, `prefix_2`, ... from (features, kernel[, strides]) tuples.

  Inside the mixed blocks every stride-1 convolution keeps the size (SAME) and
  every stride-2 one is unpadded (VALID), as in torchvision.
  """
  for i, (features, kernel, *strides) in enumerate(layers, start=1):
    stride = strides[0] if strides else 1
    x = BasicConv(
      features, kernel, stride, "SAME" if stride == 1 else "VALID", name=f"{prefix}_{i}"
    )(x)
  return x


def _fork(x, prefix: str):
  """The 1x3 (`prefix`a) and 3x1 (`prefix`b) convolutions of InceptionE, side by side."""
  return jnp.concatenate(
    [BasicConv(384, (1, 3), name=f"{prefix}a")(x), BasicConv(384, (3, 1), name=f"{prefix}b")(x)],
    axis=-1,
  )


def _avg_pool_3x3(x):
  """3x3, stride 1, padding 1, mean over the pixels inside the image (TF's SAME average pool)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int):
  padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x, (3, 3), (stride, stride), padding)


class InceptionA(nn.Module):
  """Mixed_5b-5d at 35x35 (FIDInceptionA): 1x1 | 5x5 | double 3x3 | avg pool + 1x1."""

  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate(
      [
        BasicConv(64, name="branch1x1")(x),
        _branch(x, "branch5x5", (48, 1), (64, 5)),
        _branch(x, "branch3x3dbl", (64, 1), (96, 3), (96, 3)),
        BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x)),
      ],
      axis=-1,
    )


class InceptionB(nn.Module):
  """Mixed_6a, 35x35 -> 17x17 (torchvision's InceptionB): 3x3/2 | double 3x3, last /2 | max pool /2."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate(
      [
        BasicConv(384, 3, 2, "VALID", name="branch3x3")(x),
        _branch(x, "branch3x3dbl", (64, 1), (96, 3), (96, 3, 2)),
        _max_pool_3x3(x, 2),
      ],
      axis=-1,
    )


class InceptionC(nn.Module):
  """Mixed_6b-6e at 17x17 (FIDInceptionC): 1x1 | 1x7, 7x1 | (7x1, 1x7) twice | avg pool + 1x1."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    return jnp.concatenate(
      [
        BasicConv(192, name="branch1x1")(x),
        _branch(x, "branch7x7", (c7, 1), (c7, (1, 7)), (192, (7, 1))),
        _branch(
          x, "branch7x7dbl", (c7, 1), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))
        ),
        BasicConv(192, name="branch_pool")(_avg_pool_3x3(x)),
      ],
      axis=-1,
    )


class InceptionD(nn.Module):
  """Mixed_7a, 17x17 -> 8x8 (torchvision's InceptionD): 1x1, 3x3/2 | 1x1, 1x7, 7x1, 3x3/2 | max pool /2."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate(
      [
        _branch(x, "branch3x3", (192, 1), (320, 3, 2)),
        _branch(x, "branch7x7x3", (192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2)),
        _max_pool_3x3(x, 2),
      ],
      axis=-1,
    )


class InceptionE(nn.Module):
  """Mixed_7b ("avg" pool, FIDInceptionE_1) and Mixed_7c ("max" pool, FIDInceptionE_2) at 8x8."""

  pool: Literal["avg", "max"]

  @nn.compact
  def __call__(self, x):
    pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
    return jnp.concatenate(
      [
        BasicConv(320, name="branch1x1")(x),
        _fork(BasicConv(384, name="branch3x3_1")(x), "branch3x3_2"),
        _fork(_branch(x, "branch3x3dbl", (448, 1), (384, 3)), "branch3x3dbl_3"),
        BasicConv(192, name="branch_pool")(pooled),
      ],
      axis=-1,
    )


class UnbiasedLogits(nn.Module):
  """The 1008-way classifier `fc` without its bias: pool3 [N, 2048] @ kernel -> [N, 1008].

  `bias` is part of the published file and so of the parameter tree (every file
  key has a leaf), but the Inception Score's logits leave it out.
  """

  @nn.compact
  def __call__(self, pool_Nx2048):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (POOL_FEATURES, NUM_CLASSES))
    self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
    return jnp.dot(pool_Nx2048, kernel, precision=HIGHEST)


class InceptionV3(nn.Module):
  """pytorch-fid's FID Inception on inputs [N, 299, 299, 3] in [-1, 1] -> {"pool", "logits", "spatial"}."""

  @nn.compact
  def __call__(self, x_Nx299x299x3):
    x = BasicConv(32, 3, 2, "VALID", name="Conv2d_1a_3x3")(x_Nx299x299x3)  # 149x149
    x = BasicConv(32, 3, 1, "VALID", name="Conv2d_2a_3x3")(x)  # 147x147
    x = BasicConv(64, 3, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2)  # 73x73
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, 1, "VALID", name="Conv2d_4a_3x3")(x)  # 71x71
    x = _max_pool_3x3(x, 2)  # 35x35
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, name=name)(x)
    x = InceptionB(name="Mixed_6a")(x)  # 17x17x768
    for name, channels_7x7 in (
      ("Mixed_6b", 128),
      ("Mixed_6c", 160),
      ("Mixed_6d", 160),
      ("Mixed_6e", 192),
    ):
      x = InceptionC(channels_7x7, name=name)(x)
      if name == "Mixed_6d":  # its first channels are branch1x1's (concatenated first)
        spatial_Nx17x17x7 = x[..., :SPATIAL_CHANNELS]
    x = InceptionD(name="Mixed_7a")(x)  # 8x8x1280
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)  # 8x8x2048
    pool_Nx2048 = jnp.mean(x, axis=(1, 2))
    return {
      "pool": pool_Nx2048,
      "logits": UnbiasedLogits(name="fc")(pool_Nx2048),
      "spatial": spatial_Nx17x17x7.reshape(x.shape[0], -1),
    }


def apply_inception(variables, images_NxHxWxC: jax.Array, resize: ResizeMode = "tf") -> dict:
  """Pure and jittable: uint8 images [N, H, W, 1|3] -> {"pool" [N, 2048], "logits" [N, 1008],
  "spatial" [N, 2023]} float32. `variables` from `load_inception` / `params_from_state_dict`."""
  return InceptionV3().apply(variables, preprocess(images_NxHxWxC, resize))


# ----------------------------------------------------------------------------- weights

# (collection, our leaf name) -> the state dict's last name component.
_TORCH_LEAF_NAMES = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIX = ".num_batches_tracked"  # BatchNorm's training counter


def _layout(shape: tuple[int, ...]) -> torch_layouts.Layout:
  """How the torch tensor of a leaf of `shape` maps: conv kernels OIHW -> HWIO, the fc kernel
  [out, in] -> [in, out], vectors as they are."""
  return {4: torch_layouts.CONV, 2: torch_layouts.dense()}.get(len(shape), torch_layouts.SAME)


@functools.cache
def _abstract_variables() -> dict:
  """{path tuple: ShapeDtypeStruct} of the network's variables, e.g. ("params", "fc", "kernel")."""
  shapes = jax.eval_shape(
    InceptionV3().init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
  )
  return traverse_util.flatten_dict(shapes)


def _torch_key(path: tuple[str, ...]) -> str:
  collection, *modules, leaf = path
  return ".".join([*modules, _TORCH_LEAF_NAMES[collection, leaf]])


def params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """The network's variables {"params", "batch_stats"} from the PyTorch state dict of the FID Inception.

  Maps by name (`Mixed_6e.branch7x7_2.conv.weight` -> params/Mixed_6e/branch7x7_2/
  conv/kernel), conv kernels OIHW -> HWIO, fc.weight [1008, 2048] -> kernel
  [2048, 1008]; `*.num_batches_tracked` is ignored.

  Raises:
    ValueError: one line naming every missing key, every unexpected key and every
      key whose shape differs from the network's (expected vs got).
  """
  variables = _abstract_variables()
  targets = {
    _torch_key(path): (path, leaf.shape, _layout(leaf.shape)) for path, leaf in variables.items()
  }
  given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
  try:
    leaves = torch_layouts.flax_leaves(targets, given)
  except ValueError as e:
    raise ValueError(f"The state dict is not the FID Inception's: {e}") from e
  return traverse_util.unflatten_dict({path: jnp.asarray(leaf) for path, leaf in leaves.items()})


def load_inception(path: str) -> dict:
  """The network's variables from a PyTorch weight file, e.g. WEIGHTS_FILE (see WEIGHTS_URLS).

  Read with `weightfiles.load` (no torch, no pickled code run); the published
  file's SHA-256 begins with WEIGHTS_SHA256_PREFIX (`weightfiles.sha256(path)`).

  Raises:
    weightfiles.WeightFileError: the file cannot be read (it names the path).
    ValueError: naming `path` and the mismatched keys (see `params_from_state_dict`).
  """
  state_dict = weightfiles.load(path)
  try:
    return params_from_state_dict(state_dict)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


# ----------------------------------------------------------------------------- batched runs


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@functools.cache
def _compiled(mesh, resize: ResizeMode):
  """(preprocess, network) jitted onto `mesh`: the batch split over "data", variables replicated.

  Two programs, so the network compiles once per batch size whatever the images' H x W.
  """
  batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  jit = functools.partial(
    jax.jit, out_shardings=batch, compiler_options=parallel.compiler_options(mesh)
  )
  preprocess_fn = jit(functools.partial(preprocess, resize=resize), in_shardings=batch)
  network_fn = jit(InceptionV3().apply, in_shardings=(replicated, batch))
  return preprocess_fn, network_fn


def sharded_features_fn(variables, resize: ResizeMode, mesh) -> Callable[[jax.Array], dict]:
  """`features(uint8 [B, H, W, C]) -> {"pool", "logits", "spatial"}` on batches sharded over `mesh`.

  The batch (a `jax.Array` split over the mesh's "data" axis, B a multiple of
  its size) may span the devices of several processes, each holding its rows;
  the features come back sharded the same way. `variables` are the same on
  every process and replicated onto the mesh here.
  """
  check_resize(resize)
  preprocess_fn, network_fn = _compiled(mesh, resize)
  variables = multihost_utils.host_local_array_to_global_array(variables, mesh, P())
  return lambda images: network_fn(variables, preprocess_fn(images))


def inception_features(
  variables,
  images_NxHxWxC: np.ndarray,
  resize: ResizeMode = "tf",
  *,
  batch_size: int = 128,
  mesh=None,
) -> dict[str, np.ndarray]:
  """Inception features of many uint8 images, in batches over the mesh's "data" axis.

  Args:
    variables: from `load_inception` / `params_from_state_dict`.
    images_NxHxWxC: uint8 [N, H, W, 3] or [N, H, W, 1], any H and W (on the host;
      moved one batch at a time).
    resize: "tf" (the published numbers) or "pytorch-fid"; see the module docstring.
    batch_size: images per step, rounded up to a multiple of the data-axis size;
      a smaller N runs as one batch of N rounded up the same way. Every batch
      has one size, so the network compiles once; the last is zero-padded and
      the padding dropped. Activations take about 9 MB per image.
    mesh: `parallel.make_mesh()` over all devices when None. With several
      processes pass a mesh of `jax.local_devices()`: each process then
      computes the features of its own images.

  Returns:
    {"pool": [N, 2048], "logits": [N, 1008], "spatial": [N, 2023]} float32 numpy arrays.
  """
  check_images(np.shape(images_NxHxWxC), images_NxHxWxC.dtype)
  check_resize(resize)
  count = len(images_NxHxWxC)
  if count == 0:
    raise ValueError("inception_features got no images (N = 0).")
  mesh = parallel.make_mesh() if mesh is None else mesh
  features_fn = sharded_features_fn(variables, resize, mesh)
  devices = mesh.shape[parallel.DATA_AXIS]
  step = min(_round_up(batch_size, devices), _round_up(count, devices))
  outputs, pending = [], None
  for start in range(0, count, step):
    batch = np.asarray(images_NxHxWxC[start : start + step])
    batch = np.pad(batch, [(0, step - len(batch))] + [(0, 0)] * 3)
    features = features_fn(jax.device_put(batch, parallel.batch_sharding(mesh)))
    if pending is not None:  # fetch the previous batch while this one runs
      outputs.append(jax.device_get(pending))
    pending = features
  outputs.append(jax.device_get(pending))
  return {name: np.concatenate([out[name] for out in outputs])[:count] for name in pending}
