"""The diffusion U-Net of DDPM, Improved DDPM and ADM, as one configurable module.

DDPM (Ho et al. 2020, App. B): a PixelCNN++-style U-Net of Wide-ResNet blocks
with GroupNorm and swish, the timestep added to every block through a
sinusoidal embedding and an MLP, self-attention at 16x16, skip connections by
concatenation. The switches below add the later refinements of Improved DDPM
(Nichol & Dhariwal 2021) and ADM (Dhariwal & Nichol 2021); the zoo (zoo.py)
names the settings of each published model.
"""

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.config.models import UNetSettings
from diffusion_jax.models.layers import (
  AttentionBlock,
  Downsample,
  GroupNorm,
  ResBlock,
  TimeEmbedding,
  Upsample,
)

# ResBlock.__call__(self, x, emb, train): `train` (argument 3) is a Python bool.
_RematResBlock = nn.remat(ResBlock, static_argnums=(3,))


class UNet(UNetSettings, nn.Module):
  """Noise-prediction U-Net, (x [B, H, W, C], t [B], y [B]) -> [B, H, W, C_out].

  Layout, with L = len(ch_mult) resolutions and ch_l = ch * ch_mult[l]:
    conv_in; for each level l: num_res_blocks ResBlocks (width ch_l), each
    followed by attention if the current side length is in attn_resolutions,
    then a downsample (except at the last level);
    middle: ResBlock, attention, ResBlock;
    for each level in reverse: num_res_blocks + 1 ResBlocks fed with the
    concatenation of h and the matching down-path activation, attention as
    above, then an upsample (except at level 0);
    GroupNorm, swish, zero-initialised conv_out.

  Attributes:
    ch: base channel count; the timestep embedding is 4 * ch wide.
    ch_mult: channel multiplier of each resolution level.
    num_res_blocks: residual blocks per level on the down path.
    attn_resolutions: side lengths (in pixels) at which to self-attend. They
      refer to the actual feature map, as in the DDPM code, so a model run at
      another input size attends elsewhere.
    dropout: dropout rate inside residual blocks (active when train=True, using
      the 'dropout' rng).
    learn_sigma: output 2 * C channels: the noise prediction and the
      interpolation weight of the learned variance (iDDPM Sec. 3.1).
    num_classes: class-conditional when set: the label table has
      num_classes + 1 rows, the extra one (index num_classes, selected by
      y=None) being the null label of classifier-free guidance.
    scale_shift_norm: AdaGN conditioning of residual blocks (ADM Sec. 3).
    resblock_updown: resample with BigGAN-style residual blocks (ADM Sec. 3)
      instead of strided / nearest-neighbour convolutions.
    num_heads: attention heads (iDDPM uses 4; DDPM 1).
    num_head_channels: if set, channels per head instead (ADM: 64).
    time_embedding: "ddpm" or "adm" sinusoid layout (see timestep_embedding).
    downsample_padding: "SAME" (TF, DDPM) or 1 (PyTorch, iDDPM/ADM).
    norm_eps: GroupNorm epsilon (1e-6 in the TF DDPM code, 1e-5 in PyTorch).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32 and
      the output is float32.
    remat: rematerialise residual blocks in the backward pass (gradient
      checkpointing): less activation memory, same gradients.
    attention_impl: "auto", "xla" or "cudnn": how self-attention is computed
      (layers.fused_attention); the same parameters either way.
  """

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array | None = None,
    train: bool = False,
  ) -> jax.Array:
    """Returns the float32 prediction, [B, H, W, C * (2 if learn_sigma else 1)].

    Args:
      x: noisy images [B, H, W, C]; H and W divisible by 2 ** (len(ch_mult) - 1).
      t: timesteps [B], integer or real (a scalar is broadcast).
      y: integer class labels [B], or None (the null label if num_classes).
      train: enables dropout.
    """
    self._check_input(x)
    t_B = jnp.broadcast_to(t, x.shape[:1])
    emb_BxE = TimeEmbedding(
      self.ch, 4 * self.ch, self.time_embedding, self.num_classes, self.dtype, name="time_emb"
    )(t_B, y)
    h, skips = self._down(x, emb_BxE, train)
    h = self._middle(h, emb_BxE, train)
    h = self._up(h, skips, emb_BxE, train)
    out_channels = x.shape[-1] * (2 if self.learn_sigma else 1)
    return self._head(h, out_channels)

  def _check_input(self, x_BxHxWxC: jax.Array) -> None:
    factor = 2 ** (len(self.ch_mult) - 1)
    if x_BxHxWxC.ndim != 4 or x_BxHxWxC.shape[1] % factor or x_BxHxWxC.shape[2] % factor:
      raise ValueError(
        f"UNet expects NHWC images with H and W divisible by {factor} "
        f"(len(ch_mult) = {len(self.ch_mult)}), got shape {x_BxHxWxC.shape}"
      )

  def _res_block(self, features: int, name: str, resample: Literal["up", "down"] | None = None):
    block = _RematResBlock if self.remat else ResBlock
    return block(
      features,
      dropout=self.dropout,
      scale_shift=self.scale_shift_norm,
      resample=resample,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
      name=name,
    )

  def _attention(self, name: str) -> AttentionBlock:
    return AttentionBlock(
      self.num_heads,
      self.num_head_channels,
      self.norm_eps,
      self.dtype,
      self.attention_impl,
      name=name,
    )

  def _attend_if_due(self, h: jax.Array, name: str) -> jax.Array:
    """Self-attention when h's side length is one of attn_resolutions."""
    return self._attention(name)(h) if h.shape[1] in self.attn_resolutions else h

  def _resample(self, h, emb_BxE, train: bool, direction: Literal["up", "down"], name: str):
    """Halves ("down") or doubles ("up") H and W; C is unchanged."""
    if self.resblock_updown:
      return self._res_block(h.shape[-1], name, resample=direction)(h, emb_BxE, train)
    if direction == "down":
      return Downsample(self.downsample_padding, self.dtype, name=name)(h)
    return Upsample(self.dtype, name=name)(h)

  def _down(self, x_BxHxWxC, emb_BxE, train: bool) -> tuple[jax.Array, list[jax.Array]]:
    """Contracting path; returns h and every activation kept for the skips."""
    h = nn.Conv(self.ch, (3, 3), dtype=self.dtype, name="conv_in")(x_BxHxWxC)
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = self._res_block(self.ch * mult, f"down{level}_res{i}")(h, emb_BxE, train)
        h = self._attend_if_due(h, f"down{level}_attn{i}")
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = self._resample(h, emb_BxE, train, "down", f"down{level}_downsample")
        skips.append(h)
    return h, skips

  def _middle(self, h, emb_BxE, train: bool) -> jax.Array:
    """ResBlock, attention, ResBlock at the lowest resolution (always attends)."""
    h = self._res_block(h.shape[-1], "mid_res0")(h, emb_BxE, train)
    h = self._attention("mid_attn")(h)
    return self._res_block(h.shape[-1], "mid_res1")(h, emb_BxE, train)

  def _up(self, h, skips: list[jax.Array], emb_BxE, train: bool) -> jax.Array:
    """Expansive path: each block consumes one skip, last in first out."""
    skips = list(skips)
    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._res_block(self.ch * mult, f"up{level}_res{i}")(h, emb_BxE, train)
        h = self._attend_if_due(h, f"up{level}_attn{i}")
      if level != 0:
        h = self._resample(h, emb_BxE, train, "up", f"up{level}_upsample")
    return h

  def _head(self, h, out_channels: int) -> jax.Array:
    """GroupNorm, swish, zero-initialised 3x3 conv; output cast to float32."""
    h = nn.swish(GroupNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm_out")(h))
    conv_out = nn.Conv(
      out_channels, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype, name="conv_out"
    )
    return conv_out(h).astype(jnp.float32)
