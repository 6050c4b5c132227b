"""Building blocks of the diffusion U-Nets.

Shapes are NHWC; internal tensor names carry them (`x_BxHxWxC`, `emb_BxE`).
Every module computes in `dtype` (e.g. bfloat16) and keeps float32 parameters.
Normalisation is GroupNorm with 32 groups (`GroupNorm` below: nn.GroupNorm's
parameters and outputs, statistics in float32 whatever `dtype` is, computed
the way that is fastest on the platform compiled for).

Papers:
  DDPM: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models",
    Appendix B (the U-Net of PixelCNN++ / Wide ResNet blocks).
  iDDPM: Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic
    Models" (multi-head attention at 16x16 and 8x8, openai/improved-diffusion).
  ADM: Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
    Synthesis", Sec. 3 (AdaGN, BigGAN up/down sampling, head channels).
"""

import functools
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype
from jax import lax

TimeEmbeddingKind = Literal["ddpm", "adm"]

zeros_init = nn.initializers.zeros


def timestep_embedding(
  t: jax.Array,
  dim: int,
  kind: TimeEmbeddingKind = "ddpm",
  max_period: float = 10_000.0,
) -> jax.Array:
  """Sinusoidal embedding of timesteps t [B] (integer or real), shape [B, dim].

  Transformer positional encoding (Vaswani et al. 2017, Sec. 3.5) applied to t.
  The two published variants differ in frequencies and order, so both are kept
  to load checkpoints:
    "ddpm": [sin(t w_i), cos(t w_i)], w_i = P^(-i / (half - 1))  (DDPM, TF code)
    "adm":  [cos(t w_i), sin(t w_i)], w_i = P^(-i / half)        (iDDPM / ADM)
  with i = 0 .. half-1, half = dim // 2 and P = max_period. Odd `dim` gets a
  trailing zero column.
  """
  if kind not in ("ddpm", "adm"):
    raise ValueError(f"timestep embedding kind must be 'ddpm' or 'adm', got {kind!r}")
  half = dim // 2
  denominator = half - 1 if kind == "ddpm" else half
  freqs_H = jnp.exp(-math.log(max_period) * jnp.arange(half) / denominator)
  args_BxH = jnp.asarray(t, jnp.float32)[:, None] * freqs_H[None, :]
  sin_BxH, cos_BxH = jnp.sin(args_BxH), jnp.cos(args_BxH)
  parts = [sin_BxH, cos_BxH] if kind == "ddpm" else [cos_BxH, sin_BxH]
  emb_BxD = jnp.concatenate(parts, axis=-1)
  return jnp.pad(emb_BxD, ((0, 0), (0, dim % 2)))


GroupNormImpl = Literal["auto", "matmul", "reduce"]


class GroupNorm(nn.Module):
  """Group normalisation (Wu & He 2018) of [B, H, W, C], statistics in float32.

  y = (x - mu_g) / sqrt(sigma_g^2 + eps) * scale + bias, where mu_g and
  sigma_g^2 = E[x^2] - mu_g^2 run over H, W and the C / G channels of each
  group. Same parameters (scale and bias [C]) and outputs as `nn.GroupNorm`;
  statistics are float32 whatever `dtype` is. Two ways to the group means:
    "matmul": one float32 contraction of [B, H*W, C] with the [C, G]
      channel-to-group indicator at Precision.HIGHEST. On XLA:CPU it and its
      gradients lower to matmuls, several times faster than the reductions
      (benchmarks/train_throughput.py); on TPU, HIGHEST runs as several
      bfloat16 passes, so it is kept to CPUs.
    "reduce": means over the [B, H*W, G, C/G] axes, as `nn.GroupNorm` does.
    "auto" (default): "matmul" when compiled for a CPU, "reduce" elsewhere,
      chosen at lowering by `lax.platform_dependent`.
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  implementation: GroupNormImpl = "auto"

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    channels = x_BxHxWxC.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
    scale_C = self.param("scale", nn.initializers.ones, (channels,))
    bias_C = self.param("bias", zeros_init, (channels,))
    x_BxNxC = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1, channels).astype(jnp.float32)
    moments = {
      name: functools.partial(fn, num_groups=self.num_groups)
      for name, fn in (("matmul", _group_moments_matmul), ("reduce", _group_moments_reduce))
    }
    if self.implementation == "auto":
      mean_Bx1xC, mean_sq_Bx1xC = lax.platform_dependent(
        x_BxNxC, cpu=moments["matmul"], default=moments["reduce"]
      )
    elif self.implementation in moments:
      mean_Bx1xC, mean_sq_Bx1xC = moments[self.implementation](x_BxNxC)
    else:
      raise ValueError(
        f"GroupNorm implementation must be one of {list(moments) + ['auto']},"
        f" got {self.implementation!r}"
      )
    var_Bx1xC = jnp.maximum(mean_sq_Bx1xC - mean_Bx1xC**2, 0.0)
    y_BxNxC = (x_BxNxC - mean_Bx1xC) * (lax.rsqrt(var_Bx1xC + self.epsilon) * scale_C) + bias_C
    return y_BxNxC.reshape(x_BxHxWxC.shape).astype(self.dtype)


def _group_moments_matmul(x_BxNxC: jax.Array, num_groups: int):
  """(E[x], E[x^2]) over each group of [B, N, C], as [B, 1, C]: HIGHEST-precision matmuls."""
  channels = x_BxNxC.shape[-1]
  group_size = channels // num_groups
  indicator_CxG = jnp.repeat(jnp.eye(num_groups, dtype=jnp.float32), group_size, axis=0)
  count = x_BxNxC.shape[1] * group_size

  def group_mean(v_BxNxC):
    sum_BxG = jnp.einsum("bnc,cg->bg", v_BxNxC, indicator_CxG, precision=lax.Precision.HIGHEST)
    return jnp.repeat(sum_BxG / count, group_size, axis=-1)[:, None, :]

  return group_mean(x_BxNxC), group_mean(x_BxNxC * x_BxNxC)


def _group_moments_reduce(x_BxNxC: jax.Array, num_groups: int):
  """(E[x], E[x^2]) over each group of [B, N, C], as [B, 1, C]: reductions, as nn.GroupNorm."""
  b, n, channels = x_BxNxC.shape
  group_size = channels // num_groups
  x_BxNxGxS = x_BxNxC.reshape(b, n, num_groups, group_size)

  def group_mean(v_BxNxGxS):
    mean_BxG = jnp.mean(v_BxNxGxS, axis=(1, 3))
    return jnp.repeat(mean_BxG, group_size, axis=-1)[:, None, :]

  return group_mean(x_BxNxGxS), group_mean(x_BxNxGxS * x_BxNxGxS)


def upsample_nearest(x_BxHxWxC: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling, [B, H, W, C] -> [B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)


def avg_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 average pooling with stride 2, [B, H, W, C] -> [B, H/2, W/2, C]."""
  return nn.avg_pool(x_BxHxWxC, (2, 2), strides=(2, 2))


class TimeEmbedding(nn.Module):
  """Timestep (and class) embedding, [B] -> [B, features].

  DDPM App. B / ADM: emb = W2 swish(W1 sinusoid(t) + b1) + b2, the sinusoid
  of width `dim` (the U-Net's base channels), `features` = 4 * dim.
  With `num_classes`, a learned label embedding is added (as in the ADM code).
  Its table has num_classes + 1 rows: the last one is the null label that
  trains and samples the unconditional branch of classifier-free guidance
  (Ho & Salimans 2022); `y=None` selects it.
  """

  dim: int
  features: int
  kind: TimeEmbeddingKind = "ddpm"
  num_classes: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """t: timesteps [B]; y: class labels [B] or None. Returns [B, features]."""
    dense = functools.partial(nn.Dense, self.features, dtype=self.dtype)
    sinusoid_BxD = timestep_embedding(t, self.dim, self.kind)
    emb_BxE = dense(name="dense0")(sinusoid_BxD)
    emb_BxE = dense(name="dense1")(nn.swish(emb_BxE))
    if self.num_classes is None:
      if y is not None:
        raise ValueError("class labels y were given to a model built with num_classes=None")
      return emb_BxE
    if y is None:
      y = jnp.full(t.shape, self.num_classes, jnp.int32)
    label_table = nn.Embed(self.num_classes + 1, self.features, dtype=self.dtype, name="label_emb")
    return emb_BxE + label_table(y)


class Downsample(nn.Module):
  """3x3 convolution with stride 2 (DDPM App. B), [B, H, W, C] -> [B, H/2, W/2, C].

  `padding` "SAME" pads (0, 1) like the TF DDPM code; 1 pads (1, 1) like the
  PyTorch iDDPM/ADM code. Same parameters, different sampling grid.
  """

  padding: str | int = "SAME"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    channels = x_BxHxWxC.shape[-1]
    conv = nn.Conv(channels, (3, 3), strides=(2, 2), padding=self.padding, dtype=self.dtype)
    return conv(x_BxHxWxC)


class Upsample(nn.Module):
  """Nearest 2x upsampling then 3x3 conv (DDPM App. B), [B, H, W, C] -> [B, 2H, 2W, C]."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    conv = nn.Conv(x_BxHxWxC.shape[-1], (3, 3), dtype=self.dtype)
    return conv(upsample_nearest(x_BxHxWxC))


class ResBlock(nn.Module):
  """Residual block conditioned on the embedding, [B, H, W, Cin] -> [B, H', W', C].

  DDPM (App. B, Wide-ResNet style):
    h = conv1(swish(norm1(x))) + Dense(swish(emb))
    h = conv2(dropout(swish(norm2(h))))
  ADM's AdaGN (`scale_shift`, ADM Sec. 3): Dense(swish(emb)) -> (scale, shift)
    and norm2(h) becomes norm2(h) * (1 + scale) + shift.
  BigGAN-style resampling (`resample`, ADM Sec. 3): x and h are up/downsampled
    (nearest / 2x2 average, no conv) between swish(norm1(.)) and conv1.
  Output x_skip + h, where x_skip is x, or a 1x1 conv of x when Cin != C.
  conv2 is zero-initialised so every block starts as the identity (ADM code).
  """

  features: int
  dropout: float = 0.0
  scale_shift: bool = False
  resample: Literal["up", "down"] | None = None
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, emb_BxE: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, self.features, (3, 3), dtype=self.dtype)
    norm = functools.partial(GroupNorm, epsilon=self.norm_eps, dtype=self.dtype)

    h = nn.swish(norm(name="norm1")(x_BxHxWxC))
    if self.resample is not None:
      resample = upsample_nearest if self.resample == "up" else avg_pool_2x2
      h, x_BxHxWxC = resample(h), resample(x_BxHxWxC)
    h = conv(name="conv1")(h)

    emb_width = 2 * self.features if self.scale_shift else self.features
    emb_BxE = nn.Dense(emb_width, dtype=self.dtype, name="emb_proj")(nn.swish(emb_BxE))
    emb_1x1xE = emb_BxE[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(emb_1x1xE, 2, axis=-1)
      h = norm(name="norm2")(h) * (1 + scale) + shift
    else:
      h = norm(name="norm2")(h + emb_1x1xE)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
    h = conv(kernel_init=zeros_init, name="conv2")(h)

    if x_BxHxWxC.shape[-1] != self.features:
      x_BxHxWxC = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="skip")(x_BxHxWxC)
    return x_BxHxWxC + h


AttentionImpl = Literal["auto", "xla", "cudnn"]
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def fused_attention(
  query_BxLxNxD: jax.Array,
  key_BxLxNxD: jax.Array,
  value_BxLxNxD: jax.Array,
  implementation: AttentionImpl = "auto",
) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v of each of N heads, [B, L, N, D] -> [B, L, N, D].

  `jax.nn.dot_product_attention`: "xla" computes the logits and the softmax in
  float32 whatever the inputs' dtype and casts the weights back to it before
  multiplying the values, as the iDDPM/ADM code does (`softmax(w.float()).type(w.dtype)`);
  "cudnn" is cuDNN's fused (flash) attention on an NVIDIA GPU, for float16 or
  bfloat16 inputs with D <= 128 a multiple of 8, also float32 statistics;
  "auto" takes cuDNN where it can (a GPU backend, such inputs) and XLA elsewhere.
  """
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(
      f"model.attention_impl must be one of {list(ATTENTION_IMPLS)}, got {implementation!r}"
    )
  if implementation == "auto":
    implementation = "cudnn" if _cudnn_fits(query_BxLxNxD) else "xla"
  return jax.nn.dot_product_attention(
    query_BxLxNxD, key_BxLxNxD, value_BxLxNxD, implementation=implementation
  )


def _cudnn_fits(query_BxLxNxD: jax.Array) -> bool:
  """Whether cuDNN's fused attention takes these queries on the default backend."""
  head_channels = query_BxLxNxD.shape[-1]
  return (
    jax.default_backend() == "gpu"
    and head_channels <= 128
    and head_channels % 8 == 0
    and query_BxLxNxD.dtype in (jnp.bfloat16, jnp.float16)
  )


class AttentionBlock(nn.Module):
  """Residual multi-head self-attention over the H*W positions, shape-preserving.

  DDPM App. B (one head) / iDDPM & ADM (several heads):
    x + proj_out(MHA(norm(x))), proj_out zero-initialised.
  Heads: `num_head_channels` channels each when set (ADM), else `num_heads`.
  The attention itself is `fused_attention` (`implementation`): float32
  logits and softmax whatever the compute dtype.
  """

  num_heads: int = 1
  num_head_channels: int | None = None
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  implementation: AttentionImpl = "auto"

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    b, height, width, c = x_BxHxWxC.shape
    head_channels = self.num_head_channels or c // self.num_heads
    if head_channels < 1 or c % head_channels:
      raise ValueError(
        f"cannot split {c} channels into attention heads "
        f"(num_heads={self.num_heads}, num_head_channels={self.num_head_channels})"
      )
    h = GroupNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x_BxHxWxC)
    attention = nn.MultiHeadDotProductAttention(
      num_heads=c // head_channels,
      dtype=self.dtype,
      out_kernel_init=zeros_init,
      attention_fn=functools.partial(fused_attention, implementation=self.implementation),
      name="attn",
    )
    h_BxLxC = attention(h.reshape(b, height * width, c))
    return x_BxHxWxC + h_BxLxC.reshape(b, height, width, c)
