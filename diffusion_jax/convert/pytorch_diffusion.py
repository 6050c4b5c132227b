"""pesser/pytorch_diffusion state dicts: the TF DDPM checkpoints (Ho et al. 2020) ported to PyTorch.

Keys: temb.dense.{0,1}, conv_in, down.{l}.block.{i}.{norm1, conv1, temb_proj,
norm2, conv2, nin_shortcut}, down.{l}.attn.{i}.{norm, q, k, v, proj_out} (1x1
convs, one head), down.{l}.downsample.conv, mid.{block_1, attn_1, block_2},
up.{l}.block / attn / upsample.conv (up.{l} is level l, built in reverse
order), norm_out, conv_out. Its code is the TF code's: [sin, cos] sinusoid,
downsampling padded (0, 1) then a stride-2 conv, GroupNorm eps 1e-6.

Channels, multipliers, blocks and attention levels come from the tensors; the
resolution (which the tensors cannot tell) from the flag `resolution` or a
preset; PRESETS are pytorch_diffusion's own configs (`Diffusion.from_pretrained`:
cifar10 and the LSUN models, each also as ema_*), with the step of the TF
checkpoint each was converted from. The process is DDPM's: linear betas
1e-4..0.02 over T = 1000; fixedlarge (sigma^2 = beta) for cifar10, fixedsmall
for LSUN, as `model_var_type` there.
"""

from __future__ import annotations

from typing import Any

from diffusion_jax import weightfiles
from diffusion_jax.convert import mapping
from diffusion_jax.convert.converted import (
  MAX_IMAGE_SIZE,
  Converted,
  build_params,
  check_bounds,
  check_choice,
  check_unet,
  resolutions,
  typed_flags,
)
from diffusion_jax.convert.mapping import ConvertError, Rules, StateDict

FLAG_TYPES: dict[str, Any] = dict(
  resolution=int, dropout=float, model_var_type=str, step=int, dataset=str
)
_CIFAR10 = dict(resolution=32, dropout=0.1, model_var_type="fixedlarge", dataset="cifar10")
_LSUN = dict(resolution=256, dropout=0.0, model_var_type="fixedsmall")
_BASE = dict(
  cifar10=dict(_CIFAR10, step=790_000),
  lsun_bedroom=dict(_LSUN, step=2_388_000, dataset="lsun/bedroom"),
  lsun_cat=dict(_LSUN, step=1_761_000, dataset="lsun/cat"),
  lsun_church=dict(_LSUN, step=4_432_000, dataset="lsun/church_outdoor"),
)
PRESETS: dict[str, dict[str, Any]] = {**_BASE, **{f"ema_{k}": v for k, v in _BASE.items()}}
_VAR_TYPES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}
_RES_NAMES = dict(
  norm1="norm1",
  conv1="conv1",
  emb_proj="temb_proj",
  norm2="norm2",
  conv2="conv2",
  skip="nin_shortcut",
)
_ATTENTION_NAMES = dict(norm="norm", query="q", key="k", value="v", out="proj_out")


def convert(
  path: str, preset: str | None = None, flags: dict | None = None, state: StateDict | None = None
) -> Converted:
  """Converts a pytorch_diffusion `Model` state dict (e.g. model-790000.ckpt of ema_cifar10)."""
  if preset is not None:
    check_choice(preset, tuple(PRESETS), "pytorch_diffusion preset", path)
  given = {**PRESETS.get(preset, {}), **typed_flags(flags or {}, FLAG_TYPES, "pytorch_diffusion")}
  if "resolution" not in given:
    raise ConvertError(
      f"{path}: the checkpoint does not tell the image size: pass resolution"
      f" (or a preset, one of {sorted(PRESETS)})"
    )
  check_bounds(given, {"resolution": (1, MAX_IMAGE_SIZE)}, path)
  state = state or StateDict(weightfiles.load(path), path)
  model, in_channels = _model_fields(state, given)
  size = given["resolution"]
  image_shape = (size, size, in_channels)
  check_unet(model, image_shape, path)
  rules = _rules(len(model["ch_mult"]), model["num_res_blocks"])
  var_type = check_choice(
    given.get("model_var_type", "fixedsmall"), _VAR_TYPES, "model_var_type", path
  )
  return Converted(
    model=model,
    diffusion=dict(
      schedule="linear",
      num_timesteps=1000,
      mean_type="epsilon",
      var_type=var_type,
      loss="simple",
      clip_x0=True,
      rescale_timesteps=False,
    ),
    image_shape=image_shape,
    params=build_params(model, image_shape, rules, state),
    step=given.get("step", 0),
    source={"format": "pytorch_diffusion", "path": path, "preset": preset, "flags": given},
    dataset=given.get("dataset", ""),
  )


def _model_fields(state: StateDict, given: dict) -> tuple[dict[str, Any], int]:
  """(models.UNet fields, input channels) read from the tensors, the flags' size and dropout."""
  ch, in_channels = state.shape("conv_in.weight")[:2]
  if state.shape("conv_out.weight")[0] != in_channels:
    raise ConvertError(
      f"{state.origin}: conv_out has {state.shape('conv_out.weight')[0]} output"
      f" channels for {in_channels} input channels"
    )
  levels = state.indices("down")
  widths = [state.shape(f"down.{level}.block.0.conv1.weight")[0] for level in levels]
  if any(w % ch for w in widths):
    raise ConvertError(f"{state.origin}: level widths {widths} are not multiples of ch {ch}")
  attends = [level for level in levels if state.has_prefix(f"down.{level}.attn")]
  model = dict(
    ch=ch,
    ch_mult=tuple(w // ch for w in widths),
    num_res_blocks=len(state.indices(f"down.{levels[0]}.block")),
    attn_resolutions=resolutions(given["resolution"], attends),
    dropout=float(given.get("dropout", 0.0)),
    learn_sigma=False,
    num_classes=None,
    scale_shift_norm=False,
    resblock_updown=False,
    num_heads=1,
    num_head_channels=None,
    time_embedding="ddpm",
    downsample_padding="SAME",
    norm_eps=1e-6,
  )
  return model, in_channels


def _rules(levels: int, blocks: int) -> Rules:
  """Flax path -> torch key of every block of a pytorch_diffusion Model of this depth."""
  rules = {
    **mapping.linear("time_emb/dense0", "temb.dense.0"),
    **mapping.linear("time_emb/dense1", "temb.dense.1"),
    **mapping.conv("conv_in", "conv_in"),
    **mapping.res_block("mid_res0", "mid.block_1", _RES_NAMES),
    **mapping.attention("mid_attn", "mid.attn_1", _ATTENTION_NAMES, trailing=2),
    **mapping.res_block("mid_res1", "mid.block_2", _RES_NAMES),
    **mapping.norm("norm_out", "norm_out"),
    **mapping.conv("conv_out", "conv_out"),
  }
  for level in range(levels):
    for path, count in (("down", blocks), ("up", blocks + 1)):
      for i in range(count):
        rules |= mapping.res_block(f"{path}{level}_res{i}", f"{path}.{level}.block.{i}", _RES_NAMES)
        rules |= mapping.attention(
          f"{path}{level}_attn{i}", f"{path}.{level}.attn.{i}", _ATTENTION_NAMES, trailing=2
        )
    rules |= mapping.conv(f"down{level}_downsample/Conv_0", f"down.{level}.downsample.conv")
    rules |= mapping.conv(f"up{level}_upsample/Conv_0", f"up.{level}.upsample.conv")
  return rules
