"""The PyTorch peer of a zoo U-Net: diffusers' UNet2DModel with the same architecture.

Only the DDPM family (`ddpm_*` entries) has an exact diffusers twin; its
parameter count must equal ours (35,746,307 for ddpm_cifar10), which
`diffusers_unet` checks. torch and diffusers come with `pip install -e ".[bench]"`.
"""

from __future__ import annotations

from typing import Any


def peer_available() -> str | None:
  """None when torch and diffusers import, else why not (for a printed note)."""
  try:
    import diffusers  # noqa: F401
    import torch  # noqa: F401
  except ImportError as e:
    return f"{e.name} is not installed (pip install -e '.[bench]'): no PyTorch peer column"
  return None


def diffusers_unet(fields: dict[str, Any], image_size: int, channels: int):
  """UNet2DModel equal to our DDPM `UNet(**fields)` on [image_size, image_size, channels]."""
  import diffusers

  mult, ch = fields["ch_mult"], fields["ch"]
  sizes = [image_size // 2**level for level in range(len(mult))]
  attention = [size in fields["attn_resolutions"] for size in sizes]
  return diffusers.UNet2DModel(
      sample_size=image_size, in_channels=channels, out_channels=channels,
      layers_per_block=fields["num_res_blocks"],
      block_out_channels=tuple(ch * m for m in mult),
      down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
      up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
      dropout=fields.get("dropout", 0.0), norm_eps=1e-6, downsample_padding=0,
      flip_sin_to_cos=False, freq_shift=1, act_fn="silu", norm_num_groups=32)


def count_torch_params(module) -> int:
  return sum(p.numel() for p in module.parameters())
