"""diffusers `UNet2DModel` directories (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm LSUN).

A model directory holds config.json (`_class_name` UNet2DModel) and
diffusion_pytorch_model.safetensors or .bin; a pipeline directory holds it
under unet/ with the scheduler under scheduler/. The architecture comes from
config.json, with UNet2DModel's own defaults for keys it leaves out (as
diffusers reads it); the process from the scheduler config (DDPMScheduler
keys), else DDPM's: linear betas 1e-4..0.02, T = 1000, epsilon, fixed_small.

Mapping onto models.UNet: down_blocks.l are our level l, up_blocks.i our
level L-1-i; Timesteps(freq_shift=1, flip_sin_to_cos=False) is the "ddpm"
sinusoid, (0, True) the "adm" one; downsample_padding 0 pads (0, 1) like TF
"SAME". Attention weights are read under both spellings: to_q/to_k/to_v/to_out.0
and the pre-2023 query/key/value/proj_attn of the July-2022 hub uploads.
"""

from __future__ import annotations

import json
import math
from typing import Any

from diffusion_jax import files, weightfiles
from diffusion_jax.convert import mapping
from diffusion_jax.convert.converted import (
  MAX_BLOCKS,
  MAX_CHANNELS,
  MAX_CLASSES,
  MAX_IMAGE_CHANNELS,
  MAX_IMAGE_SIZE,
  MAX_TIMESTEPS,
  Converted,
  build_params,
  check_bounds,
  check_choice,
  resolutions,
  typed_flags,
)
from diffusion_jax.convert.mapping import ConvertError, Rules, StateDict, quoted_keys

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# UNet2DModel.__init__'s defaults: what diffusers uses for a key config.json leaves out.
UNET_DEFAULTS: dict[str, Any] = dict(
  sample_size=None,
  in_channels=3,
  out_channels=3,
  center_input_sample=False,
  time_embedding_type="positional",
  time_embedding_dim=None,
  freq_shift=0,
  flip_sin_to_cos=True,
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
  mid_block_type="UNetMidBlock2D",
  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  block_out_channels=(224, 448, 672, 896),
  layers_per_block=2,
  mid_block_scale_factor=1,
  downsample_padding=1,
  downsample_type="conv",
  upsample_type="conv",
  dropout=0.0,
  act_fn="silu",
  attention_head_dim=8,
  norm_num_groups=32,
  attn_norm_num_groups=None,
  norm_eps=1e-5,
  resnet_time_scale_shift="default",
  add_attention=True,
  class_embed_type=None,
  num_class_embeds=None,
  num_train_timesteps=None,
)
# Settings the zoo U-Net has only one value of: config key -> the values it can take.
_FIXED = dict(
  center_input_sample=(False,),
  time_embedding_type=("positional",),
  act_fn=("silu", "swish"),
  norm_num_groups=(32,),
  attn_norm_num_groups=(None, 32),
  mid_block_type=("UNetMidBlock2D",),
  mid_block_scale_factor=(1,),
  downsample_type=("conv",),
  upsample_type=("conv",),
  add_attention=(True,),
  class_embed_type=(None,),
)
_TIME_EMBEDDINGS = {(1, False): "ddpm", (0, True): "adm"}  # (freq_shift, flip_sin_to_cos)
_PADDINGS = {0: "SAME", 1: 1}
_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}  # -> attends
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}
_RES_NAMES = dict(
  norm1="norm1",
  conv1="conv1",
  emb_proj="time_emb_proj",
  norm2="norm2",
  conv2="conv2",
  skip="conv_shortcut",
)
_ATTENTION_NAMES = dict(norm="group_norm", query="to_q", key="to_k", value="to_v", out="to_out.0")
_LEGACY_ATTENTION_NAMES = dict(
  norm="group_norm", query="query", key="key", value="value", out="proj_attn"
)

_BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}
_VARIANCES = {
  "fixed_small": "fixed_small",
  "fixed_small_log": "fixed_small",
  "fixed_large": "fixed_large",
  "fixed_large_log": "fixed_large",
  "learned": "learned",
  "learned_range": "learned_range",
}
# Scheduler keys that would change the process away from what DiffusionConfig describes.
_SCHEDULER_FIXED = dict(
  trained_betas=(None,),
  thresholding=(False,),
  rescale_betas_zero_snr=(False,),
  clip_sample_range=(1.0,),
)
# Bounds of config.json's numbers, checked before anything is built from them.
_BOUNDS = dict(
  block_out_channels=(1, MAX_CHANNELS),
  layers_per_block=(1, MAX_BLOCKS),
  sample_size=(1, MAX_IMAGE_SIZE),
  in_channels=(1, MAX_IMAGE_CHANNELS),
  out_channels=(1, 2 * MAX_IMAGE_CHANNELS),
  time_embedding_dim=(1, 4 * MAX_CHANNELS),
  attention_head_dim=(1, MAX_CHANNELS),
  num_class_embeds=(1, MAX_CLASSES),
)
_MAX_JSON_BYTES = 1 << 20  # config.json and scheduler_config.json are a few hundred bytes
# config.json says everything about the network; these are ours (the training step, TFDS data name).
FLAG_TYPES: dict[str, type] = dict(step=int, dataset=str)


def convert(path: str, preset: str | None = None, flags: dict | None = None) -> Converted:
  """Converts the UNet2DModel in directory `path` (a model or a pipeline directory)."""
  if preset:
    raise ConvertError(
      f"{path}: a diffusers directory takes no preset (got {preset!r}): its"
      " config.json says everything"
    )
  flags = typed_flags(flags or {}, FLAG_TYPES, "diffusers")
  model_dir = files.join(path, "unet") if files.is_dir(files.join(path, "unet")) else path
  config = read_unet_config(model_dir)
  weights = _weight_file(model_dir)
  state = StateDict(weightfiles.load(weights), weights)
  model, image_shape = unet_fields(config, model_dir)
  rules = _rules(len(config["block_out_channels"]), config["layers_per_block"], state)
  return Converted(
    model=model,
    diffusion=read_scheduler(path, model_dir, learned=model["learn_sigma"]),
    image_shape=image_shape,
    params=build_params(model, image_shape, rules, state),
    step=flags.get("step", 0),
    source={"format": "diffusers", "path": weights},
    dataset=flags.get("dataset", ""),
  )


def read_unet_config(model_dir: str) -> dict[str, Any]:
  """config.json with UNet2DModel's defaults filled in; unknown keys are an error naming them."""
  path = files.join(model_dir, "config.json")
  if not files.exists(path):
    raise ConvertError(f"{model_dir}: no config.json (a diffusers model directory has one)")
  given = _read_json(path)
  if given.get("_class_name", "UNet2DModel") != "UNet2DModel":
    raise ConvertError(
      f"{path}: _class_name {weightfiles.quote(given['_class_name'])} is not"
      " supported; supported: ['UNet2DModel']"
    )
  given = {k: v for k, v in given.items() if not k.startswith("_")}
  if unknown := sorted(set(given) - set(UNET_DEFAULTS)):
    raise ConvertError(f"{path}: unsupported UNet2DModel setting(s) {quoted_keys(unknown)}")
  check_bounds(given, _BOUNDS, path)
  return {**UNET_DEFAULTS, **given}


def _read_json(path: str) -> dict[str, Any]:
  """A JSON object of at most _MAX_JSON_BYTES; a ConvertError names the file otherwise."""
  if (size := files.size(path)) > _MAX_JSON_BYTES:
    raise ConvertError(f"{path}: {size} bytes; a diffusers config has at most {_MAX_JSON_BYTES}")
  try:
    config = json.loads(files.read_bytes(path))
  except (
    ValueError,
    RecursionError,
  ) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise ConvertError(f"{path}: not JSON: {weightfiles.quote(str(e))}") from None
  if not isinstance(config, dict):
    raise ConvertError(f"{path}: a JSON {type(config).__name__}, not an object")
  return config


def unet_fields(config: dict[str, Any], origin: str) -> tuple[dict, tuple[int, int, int]]:
  """(models.UNet fields, image shape (H, W, C)) of a UNet2DModel config."""
  for key, allowed in _FIXED.items():
    check_choice(config[key], allowed, f"UNet2DModel setting {key}", origin)
  channels = list(config["block_out_channels"])
  ch = channels[0]
  if config["time_embedding_dim"] not in (None, 4 * ch):
    raise ConvertError(
      f"{origin}: unsupported time_embedding_dim {config['time_embedding_dim']}"
      f" (the zoo U-Net's is 4 * block_out_channels[0] = {4 * ch})"
    )
  mults = [c // ch for c in channels]
  if any(m * ch != c for m, c in zip(mults, channels)):
    raise ConvertError(f"{origin}: block_out_channels {channels} are not multiples of {ch}")
  attends = _attending_levels(config, origin)
  size = config["sample_size"]
  if isinstance(size, (list, tuple)):
    size = size[0] if len(set(size)) == 1 else None
  if not isinstance(size, int):
    raise ConvertError(
      f"{origin}: sample_size {weightfiles.quote(config['sample_size'])} is not one square size"
    )
  in_ch, out_ch = config["in_channels"], config["out_channels"]
  if out_ch not in (in_ch, 2 * in_ch):
    raise ConvertError(
      f"{origin}: out_channels {out_ch} must be in_channels {in_ch} (or twice"
      " it, with a learned variance)"
    )
  if config["resnet_time_scale_shift"] == "scale_shift" and config["attn_norm_num_groups"] is None:
    raise ConvertError(
      f"{origin}: resnet_time_scale_shift 'scale_shift' with attn_norm_num_groups"
      " None (the mid-block attention then has no GroupNorm) is not supported"
    )
  head_dim = config["attention_head_dim"]
  model = dict(
    ch=ch,
    ch_mult=tuple(mults),
    num_res_blocks=config["layers_per_block"],
    attn_resolutions=resolutions(size, attends),
    dropout=float(config["dropout"]),
    learn_sigma=out_ch == 2 * in_ch,
    num_classes=config["num_class_embeds"],
    scale_shift_norm=check_choice(
      config["resnet_time_scale_shift"],
      {"default": False, "scale_shift": True},
      "resnet_time_scale_shift",
      origin,
    ),
    resblock_updown=False,
    num_heads=1,
    num_head_channels=head_dim,
    time_embedding=check_choice(
      (config["freq_shift"], config["flip_sin_to_cos"]),
      _TIME_EMBEDDINGS,
      "(freq_shift, flip_sin_to_cos)",
      origin,
    ),
    downsample_padding=check_choice(
      config["downsample_padding"], _PADDINGS, "downsample_padding", origin
    ),
    norm_eps=float(config["norm_eps"]),
  )
  return model, (size, size, in_ch)


def _attending_levels(config: dict[str, Any], origin: str) -> list[int]:
  """The levels with attention; down and up paths must agree (the zoo U-Net attends by size)."""
  down, up = list(config["down_block_types"]), list(config["up_block_types"])
  if not len(down) == len(up) == len(config["block_out_channels"]):
    raise ConvertError(
      f"{origin}: {len(down)} down blocks, {len(up)} up blocks and"
      f" {len(config['block_out_channels'])} block_out_channels differ"
    )
  down_attn = [check_choice(t, _DOWN_TYPES, "down block type", origin) for t in down]
  up_attn = [check_choice(t, _UP_TYPES, "up block type", origin) for t in reversed(up)]
  if down_attn != up_attn:
    raise ConvertError(
      f"{origin}: attention in down blocks {down} and up blocks {up} is at"
      " different resolutions; the zoo U-Net attends at the same ones"
    )
  return [level for level, attn in enumerate(down_attn) if attn]


def _weight_file(model_dir: str) -> str:
  for name in WEIGHT_FILES:
    if files.exists(files.join(model_dir, name)):
      return files.join(model_dir, name)
  raise ConvertError(f"{model_dir}: none of {list(WEIGHT_FILES)}")


def _attention(target: str, source: str, state: StateDict) -> Rules:
  legacy = f"{source}.query.weight" in state
  return mapping.attention(target, source, _LEGACY_ATTENTION_NAMES if legacy else _ATTENTION_NAMES)


def _rules(levels: int, layers: int, state: StateDict) -> Rules:
  """Flax path -> torch key for every block a UNet2DModel of this depth can have."""
  rules = {
    **mapping.linear("time_emb/dense0", "time_embedding.linear_1"),
    **mapping.linear("time_emb/dense1", "time_embedding.linear_2"),
    ("time_emb", "label_emb", "embedding"): ("class_embedding.weight", mapping.WITH_NULL_LABEL),
    **mapping.conv("conv_in", "conv_in"),
    **mapping.norm("norm_out", "conv_norm_out"),
    **mapping.conv("conv_out", "conv_out"),
  }
  for name, index in (("mid_res0", 0), ("mid_res1", 1)):
    rules |= mapping.res_block(name, f"mid_block.resnets.{index}", _RES_NAMES)
  rules |= _attention("mid_attn", "mid_block.attentions.0", state)
  for level in range(levels):
    down, up = f"down_blocks.{level}", f"up_blocks.{levels - 1 - level}"
    for i in range(layers + 1):
      if i < layers:
        rules |= mapping.res_block(f"down{level}_res{i}", f"{down}.resnets.{i}", _RES_NAMES)
        rules |= _attention(f"down{level}_attn{i}", f"{down}.attentions.{i}", state)
      rules |= mapping.res_block(f"up{level}_res{i}", f"{up}.resnets.{i}", _RES_NAMES)
      rules |= _attention(f"up{level}_attn{i}", f"{up}.attentions.{i}", state)
    rules |= mapping.conv(f"down{level}_downsample/Conv_0", f"{down}.downsamplers.0.conv")
    rules |= mapping.conv(f"up{level}_upsample/Conv_0", f"{up}.upsamplers.0.conv")
  return rules


def read_scheduler(path: str, model_dir: str, learned: bool) -> dict[str, Any]:
  """DiffusionConfig fields from the scheduler config beside the model, else DDPM's defaults."""
  candidates = [
    files.join(path, "scheduler_config.json"),
    files.join(path, "scheduler", "scheduler_config.json"),
    files.join(model_dir, "scheduler_config.json"),
  ]
  found = next((c for c in candidates if files.exists(c)), None)
  scheduler = _read_json(found) if found else {}
  origin = found or path
  check_bounds(scheduler, {"num_train_timesteps": (1, MAX_TIMESTEPS)}, origin)
  for key, allowed in _SCHEDULER_FIXED.items():
    check_choice(scheduler.get(key, allowed[0]), allowed, f"scheduler setting {key}", origin)
  steps = int(scheduler.get("num_train_timesteps", 1000))
  schedule = check_choice(
    scheduler.get("beta_schedule", "linear"), _BETA_SCHEDULES, "beta_schedule", origin
  )
  if schedule == "linear":
    _check_linear_betas(scheduler, steps, origin)
  var_type = check_choice(
    scheduler.get("variance_type", "fixed_small"), _VARIANCES, "variance_type", origin
  )
  if learned != var_type.startswith("learned"):
    raise ConvertError(
      f"{origin}: variance_type {var_type!r} does not fit a model with"
      f" {'twice' if learned else 'as many'} output channels as inputs"
    )
  return dict(
    schedule=schedule,
    num_timesteps=steps,
    mean_type=check_choice(
      scheduler.get("prediction_type", "epsilon"), _PREDICTIONS, "prediction_type", origin
    ),
    var_type=var_type,
    loss="hybrid" if learned else "simple",
    clip_x0=bool(scheduler.get("clip_sample", True)),
    rescale_timesteps=False,
  )


def _check_linear_betas(scheduler: dict, steps: int, origin: str) -> None:
  """diffusers' linear betas must be ours: 1e-4..0.02 times 1000 / T (schedules.linear_betas)."""
  expected = {"beta_start": 1e-4 * 1000 / steps, "beta_end": 0.02 * 1000 / steps}
  for key, value in expected.items():
    given = float(scheduler.get(key, {"beta_start": 1e-4, "beta_end": 0.02}[key]))
    if not math.isclose(given, value, rel_tol=1e-6):
      raise ConvertError(
        f"{origin}: linear {key} {given} is not supported with"
        f" num_train_timesteps {steps} (the zoo's linear schedule has {value:g})"
      )
