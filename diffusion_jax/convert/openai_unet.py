"""openai/improved-diffusion and guided-diffusion `UNetModel` state dicts (`*.pt`).

The architecture is read from the tensors: channels and multipliers, residual
blocks per level, the levels with attention, AdaGN (scale-shift norm: the
embedding projection is twice the block's width), BigGAN-style up/down
sampling (a residual block where an `Upsample` conv would be), a learned
variance (twice the input channels out) and the number of classes. What the
tensors cannot tell comes from flags named as in the repos' script_util.py,
with their defaults: image_size (no default here: it sets the attention
resolutions and the data), num_heads / num_head_channels / num_heads_upsample,
use_new_attention_order, dropout, diffusion_steps, noise_schedule,
rescale_timesteps (True in improved-diffusion, False in guided-diffusion),
predict_xstart, sigma_small, use_kl. Flags the tensors do tell (num_channels,
num_res_blocks, learn_sigma, class_cond, use_scale_shift_norm, resblock_updown,
channel_mult, attention_resolutions) are checked against them, so a README's
MODEL_FLAGS can be passed as they are. PRESETS hold the released checkpoints'.

Conventions of this code, kept by the zoo's U-Net fields: [cos, sin]
sinusoid ("adm"), symmetric padding of the stride-2 conv, GroupNorm eps 1e-5
(computed in float32), attention q, k, v fused in one Conv1d (see
mapping.qkv_part for the two channel orders).
"""

from __future__ import annotations

import re
from typing import Any

from diffusion_jax import torch_layouts, weightfiles
from diffusion_jax.convert import mapping
from diffusion_jax.convert.converted import (
  Converted,
  build_params,
  check_bounds,
  check_unet,
  resolutions,
  typed_flags,
)
from diffusion_jax.convert.mapping import ConvertError, Rules, StateDict
from diffusion_jax.convert.openai_flags import FLAG_BOUNDS, FLAG_TYPES, REPO_DEFAULTS, preset_flags

_RES_NAMES = dict(
  norm1="in_layers.0",
  conv1="in_layers.2",
  emb_proj="emb_layers.1",
  norm2="out_layers.0",
  conv2="out_layers.3",
  skip="skip_connection",
)
# improved-diffusion's training loop saves `model{step}.pt` and `ema_{rate}_{step}.pt`.
_STEP_IN_NAME = re.compile(r"(?:^model|^ema_[0-9.]+_)(\d+)\.pt$")


def convert(
  path: str,
  repo: str,
  preset: str | None = None,
  flags: dict | None = None,
  state: StateDict | None = None,
) -> Converted:
  """Converts an improved-diffusion (repo "improved") or guided-diffusion ("guided") checkpoint."""
  given = {
    **preset_flags(repo, preset),
    **typed_flags(flags or {}, FLAG_TYPES, "improved/guided-diffusion"),
  }
  options = {**REPO_DEFAULTS[repo], **given}
  check_bounds(options, FLAG_BOUNDS, path)
  state = state or StateDict(weightfiles.load(path), path)
  arch = read_architecture(state)
  model, image_size = _model_fields(arch, options, given, path)
  image_shape = (image_size, image_size, arch["in_channels"])
  check_unet(model, image_shape, path)
  rules = _rules(arch, options["use_new_attention_order"])
  step = given.get("step", _step_from_name(path))
  return Converted(
    model=model,
    diffusion=_diffusion_fields(arch, options),
    image_shape=image_shape,
    params=build_params(model, image_shape, rules, state),
    step=step,
    source={"format": f"{repo}_diffusion", "path": path, "preset": preset, "flags": given},
    dataset=given.get("dataset", ""),
  )


def _kind(state: StateDict, prefix: str) -> str:
  """What sub-module `prefix` of an input or output block is: res, attn, up, down (or absent)."""
  if f"{prefix}.qkv.weight" in state:
    return "attn"
  if state.has_prefix(f"{prefix}.in_layers"):
    return "res"
  if f"{prefix}.conv.weight" in state:
    return "up"
  if f"{prefix}.op.weight" in state:
    return "down"
  if state.has_prefix(prefix):
    keys = sorted(k for k in state if k.startswith(prefix + "."))
    raise ConvertError(
      f"{state.origin}: unsupported block {prefix} with keys {mapping.quoted_keys(keys)}"
    )
  return "absent"


def read_architecture(state: StateDict) -> dict[str, Any]:
  """What the tensors say: ch, in/out channels, levels, res blocks, mults, attention, switches."""
  emb_out, ch = state.shape("time_embed.0.weight")
  in_channels = state.shape("input_blocks.0.0.weight")[1]
  if emb_out != 4 * ch or state.shape("input_blocks.0.0.weight")[0] != ch:
    raise ConvertError(
      f"{state.origin}: time_embed.0 {(emb_out, ch)} and input_blocks.0.0"
      f" {state.shape('input_blocks.0.0.weight')} do not fit a U-Net of"
      f" model_channels {ch} with channel_mult[0] = 1 (guided-diffusion's"
      " 512x512 channel_mult 0.5,... is not supported)"
    )
  out_channels = state.shape("out.2.weight")[0]
  if out_channels not in (in_channels, 2 * in_channels):
    raise ConvertError(
      f"{state.origin}: {out_channels} output channels for {in_channels} input"
      " channels (super-resolution and other UNetModel variants are not"
      " supported)"
    )
  outputs = state.indices("output_blocks")
  resamplers = [
    _kind(state, f"output_blocks.{k}.{j}")
    for k in outputs
    for j in state.indices(f"output_blocks.{k}")[1:]
  ]
  levels = 1 + sum(kind != "attn" for kind in resamplers)
  if len(outputs) % levels:
    raise ConvertError(
      f"{state.origin}: {len(outputs)} output blocks do not split into {levels} levels"
    )
  num_res_blocks = len(outputs) // levels - 1
  firsts = [1 + level * (num_res_blocks + 1) for level in range(levels)]  # input block indices
  widths = [state.shape(f"input_blocks.{k}.0.out_layers.3.weight")[0] for k in firsts]
  if any(w % ch for w in widths):
    raise ConvertError(f"{state.origin}: level widths {widths} are not multiples of {ch}")
  return dict(
    ch=ch,
    in_channels=in_channels,
    learn_sigma=out_channels == 2 * in_channels,
    num_res_blocks=num_res_blocks,
    ch_mult=tuple(w // ch for w in widths),
    attention_levels=[
      level for level, k in enumerate(firsts) if _kind(state, f"input_blocks.{k}.1") == "attn"
    ],
    scale_shift_norm=state.shape(f"input_blocks.{firsts[0]}.0.emb_layers.1.weight")[0]
    == 2 * widths[0],
    resblock_updown="res" in resamplers,
    num_classes=state["label_emb.weight"].shape[0] if "label_emb.weight" in state else None,
  )


def _model_fields(arch: dict, options: dict, given: dict, origin: str) -> tuple[dict, int]:
  """(models.UNet fields, image_size): the tensors' architecture, the flags' heads and size."""
  image_size = _image_size(arch, given, origin)
  _check_given_flags(arch, given, image_size, origin)
  heads, head_channels = options["num_heads"], options["num_head_channels"]
  if options["num_heads_upsample"] not in (-1, heads) and head_channels == -1:
    raise ConvertError(
      f"{origin}: num_heads_upsample {options['num_heads_upsample']} !="
      f" num_heads {heads} is not supported (one head count for the whole U-Net)"
    )
  model = dict(
    ch=arch["ch"],
    ch_mult=arch["ch_mult"],
    num_res_blocks=arch["num_res_blocks"],
    attn_resolutions=resolutions(image_size, arch["attention_levels"]),
    dropout=float(options["dropout"]),
    learn_sigma=arch["learn_sigma"],
    num_classes=arch["num_classes"],
    scale_shift_norm=arch["scale_shift_norm"],
    resblock_updown=arch["resblock_updown"],
    num_heads=heads,
    num_head_channels=None if head_channels == -1 else head_channels,
    time_embedding="adm",
    downsample_padding=1,
    norm_eps=1e-5,
  )
  return model, image_size


def _image_size(arch: dict, given: dict, origin: str) -> int:
  """The image_size flag, or the one that attention_resolutions (pixels) and the tensors imply."""
  if "image_size" in given:
    return int(given["image_size"])
  if "attention_resolutions" in given and arch["attention_levels"]:
    first = int(str(given["attention_resolutions"]).split(",")[0])
    return first << arch["attention_levels"][0]
  raise ConvertError(
    f"{origin}: the checkpoint does not tell the image size: pass image_size (or a preset)"
  )


def _check_given_flags(arch: dict, given: dict, image_size: int, origin: str) -> None:
  """Flags the tensors also tell must agree with them; each disagreement is named."""
  told = dict(
    num_channels=arch["ch"],
    num_res_blocks=arch["num_res_blocks"],
    learn_sigma=arch["learn_sigma"],
    class_cond=arch["num_classes"] is not None,
    use_scale_shift_norm=arch["scale_shift_norm"],
    resblock_updown=arch["resblock_updown"],
    attention_resolutions=sorted(resolutions(image_size, arch["attention_levels"])),
    channel_mult=list(arch["ch_mult"]),
  )
  wrong = [
    f"{flag}={given[flag]} (the checkpoint has {actual})"
    for flag, actual in told.items()
    if given.get(flag, "") != "" and _comparable(flag, given[flag]) != actual
  ]
  if wrong:
    raise ConvertError(
      f"{origin}: flags disagree with the checkpoint at image_size {image_size}: {', '.join(wrong)}"
    )


def _comparable(flag: str, value: Any) -> Any:
  """A flag's value as `_check_given_flags` compares it: lists for the comma-separated ones."""
  if flag == "attention_resolutions":
    return sorted(int(v) for v in str(value).split(","))
  if flag == "channel_mult":
    return [int(v) for v in str(value).split(",")]
  return value


def _diffusion_fields(arch: dict, options: dict) -> dict[str, Any]:
  """DiffusionConfig fields from the repos' diffusion flags."""
  if arch["learn_sigma"]:
    var_type = "learned_range"
  else:
    var_type = "fixed_small" if options["sigma_small"] else "fixed_large"
  if options["use_kl"]:
    loss = "vlb"
  else:
    loss = "hybrid" if arch["learn_sigma"] else "simple"
  schedule = options["noise_schedule"]
  if schedule not in ("linear", "cosine"):
    raise ConvertError(f"unsupported noise_schedule {schedule!r}; supported: ['linear', 'cosine']")
  return dict(
    schedule=schedule,
    num_timesteps=int(options["diffusion_steps"]),
    mean_type="x0" if options["predict_xstart"] else "epsilon",
    var_type=var_type,
    loss=loss,
    clip_x0=True,
    rescale_timesteps=bool(options["rescale_timesteps"]),
  )


def _attention(target: str, source: str, new_order: bool) -> Rules:
  rules = mapping.norm(f"{target}/norm", f"{source}.norm")
  for part, name in enumerate(("query", "key", "value")):
    layout = mapping.qkv_part(part, legacy=not new_order)
    rules[(target, "attn", name, "kernel")] = (f"{source}.qkv.weight", layout)
    rules[(target, "attn", name, "bias")] = (f"{source}.qkv.bias", layout)
  rules[(target, "attn", "out", "kernel")] = (
    f"{source}.proj_out.weight",
    torch_layouts.dense(2, trailing=1),
  )
  rules[(target, "attn", "out", "bias")] = (f"{source}.proj_out.bias", torch_layouts.SAME)
  return rules


def _resampler(target: str, source: str, updown: bool, conv_name: str) -> Rules:
  if updown:
    return mapping.res_block(target, source, _RES_NAMES)
  return mapping.conv(f"{target}/Conv_0", f"{source}.{conv_name}")


def _rules(arch: dict, new_order: bool) -> Rules:
  """Flax path -> torch key, walking input_blocks / output_blocks as UNetModel builds them."""
  levels, blocks, updown = len(arch["ch_mult"]), arch["num_res_blocks"], arch["resblock_updown"]
  rules = {
    **mapping.linear("time_emb/dense0", "time_embed.0"),
    **mapping.linear("time_emb/dense1", "time_embed.2"),
    ("time_emb", "label_emb", "embedding"): ("label_emb.weight", mapping.WITH_NULL_LABEL),
    **mapping.conv("conv_in", "input_blocks.0.0"),
    **mapping.res_block("mid_res0", "middle_block.0", _RES_NAMES),
    **_attention("mid_attn", "middle_block.1", new_order),
    **mapping.res_block("mid_res1", "middle_block.2", _RES_NAMES),
    **mapping.norm("norm_out", "out.0"),
    **mapping.conv("conv_out", "out.2"),
  }
  k = 1
  for level in range(levels):
    for i in range(blocks):
      rules |= mapping.res_block(f"down{level}_res{i}", f"input_blocks.{k}.0", _RES_NAMES)
      rules |= _attention(f"down{level}_attn{i}", f"input_blocks.{k}.1", new_order)
      k += 1
    if level != levels - 1:
      rules |= _resampler(f"down{level}_downsample", f"input_blocks.{k}.0", updown, "op")
      k += 1
  k = 0
  for level in reversed(range(levels)):
    for i in range(blocks + 1):
      rules |= mapping.res_block(f"up{level}_res{i}", f"output_blocks.{k}.0", _RES_NAMES)
      rules |= _attention(f"up{level}_attn{i}", f"output_blocks.{k}.1", new_order)
      if i == blocks and level:
        position = 2 if level in arch["attention_levels"] else 1
        rules |= _resampler(f"up{level}_upsample", f"output_blocks.{k}.{position}", updown, "conv")
      k += 1
  return rules


def _step_from_name(path: str) -> int:
  """The step an improved-diffusion file name states (ema_0.9999_200000.pt), or 0."""
  match = _STEP_IN_NAME.search(path.replace("\\", "/").rsplit("/", 1)[-1])
  return int(match.group(1)) if match else 0
