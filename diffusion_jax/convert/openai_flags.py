"""The flags of openai/improved-diffusion and guided-diffusion, and their released checkpoints'.

Flag names, types and defaults are those of each repo's script_util.py
(`model_and_diffusion_defaults`); PRESETS are the MODEL_FLAGS and
DIFFUSION_FLAGS their READMEs give for each released checkpoint, plus the
training step the file name states and the training data's TFDS name.
"""

from __future__ import annotations

from typing import Any

from diffusion_jax.convert.converted import (
  MAX_BLOCKS,
  MAX_CHANNELS,
  MAX_HEADS,
  MAX_IMAGE_SIZE,
  MAX_TIMESTEPS,
)
from diffusion_jax.convert.mapping import ConvertError


def _str2bool(value: Any) -> bool:
  """The repos' str2bool: yes/true/t/y/1 and no/false/f/n/0, any case."""
  if isinstance(value, bool):
    return value
  if str(value).lower() in ("yes", "true", "t", "y", "1"):
    return True
  if str(value).lower() in ("no", "false", "f", "n", "0"):
    return False
  raise ValueError(f"boolean value expected, got {value!r}")


# Flag -> type; `step` and `dataset` are ours (the source's training step, the TFDS data name).
FLAG_TYPES: dict[str, Any] = dict(
  image_size=int,
  num_channels=int,
  num_res_blocks=int,
  num_heads=int,
  num_heads_upsample=int,
  num_head_channels=int,
  attention_resolutions=str,
  channel_mult=str,
  dropout=float,
  class_cond=_str2bool,
  use_checkpoint=_str2bool,
  use_scale_shift_norm=_str2bool,
  resblock_updown=_str2bool,
  use_fp16=_str2bool,
  use_new_attention_order=_str2bool,
  learn_sigma=_str2bool,
  sigma_small=_str2bool,
  diffusion_steps=int,
  noise_schedule=str,
  timestep_respacing=str,
  use_kl=_str2bool,
  predict_xstart=_str2bool,
  rescale_timesteps=_str2bool,
  rescale_learned_sigmas=_str2bool,
  step=int,
  dataset=str,
)
# Bounds of the numeric flags (-1: unset, as the repos write it), checked before anything is built.
FLAG_BOUNDS: dict[str, tuple[int, int]] = dict(
  image_size=(1, MAX_IMAGE_SIZE),
  num_channels=(1, MAX_CHANNELS),
  num_res_blocks=(1, MAX_BLOCKS),
  num_heads=(-1, MAX_HEADS),
  num_heads_upsample=(-1, MAX_HEADS),
  num_head_channels=(-1, MAX_CHANNELS),
  diffusion_steps=(1, MAX_TIMESTEPS),
)

_IMPROVED = dict(
  num_heads=4,
  num_heads_upsample=-1,
  num_head_channels=-1,
  use_new_attention_order=False,
  dropout=0.0,
  sigma_small=False,
  diffusion_steps=1000,
  noise_schedule="linear",
  use_kl=False,
  predict_xstart=False,
  rescale_timesteps=True,
  rescale_learned_sigmas=True,
)
# The defaults of what the tensors cannot tell; the repos differ in rescale_timesteps.
REPO_DEFAULTS: dict[str, dict[str, Any]] = {
  "improved": _IMPROVED,
  "guided": {**_IMPROVED, "rescale_timesteps": False, "rescale_learned_sigmas": False},
}

_IDDPM_CIFAR = dict(
  image_size=32,
  num_channels=128,
  num_res_blocks=3,
  learn_sigma=True,
  dropout=0.3,
  diffusion_steps=4000,
  noise_schedule="cosine",
  dataset="cifar10",
)
_IDDPM_IMAGENET = dict(
  image_size=64,
  num_channels=128,
  num_res_blocks=3,
  learn_sigma=True,
  diffusion_steps=4000,
  noise_schedule="cosine",
  dataset="imagenet_resized/64x64",
)
_IDDPM_LSUN = dict(
  image_size=256,
  num_channels=128,
  num_res_blocks=2,
  num_heads=1,
  learn_sigma=True,
  use_scale_shift_norm=False,
  attention_resolutions="16",
  diffusion_steps=1000,
  noise_schedule="linear",
  rescale_learned_sigmas=False,
  rescale_timesteps=False,
  dataset="lsun/bedroom",
)
_ADM = dict(
  attention_resolutions="32,16,8",
  diffusion_steps=1000,
  learn_sigma=True,
  noise_schedule="linear",
  num_channels=256,
  num_res_blocks=2,
  resblock_updown=True,
  use_fp16=True,
  use_scale_shift_norm=True,
)
_ADM_LSUN = dict(_ADM, class_cond=False, dropout=0.1, image_size=256, num_head_channels=64)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
  "improved": {
    "cifar10_uncond_50M_500K": dict(_IDDPM_CIFAR, step=500_000),
    "cifar10_uncond_vlb_50M_500K": dict(_IDDPM_CIFAR, use_kl=True, step=500_000),
    "imagenet64_uncond_100M_1500K": dict(_IDDPM_IMAGENET, step=1_500_000),
    "imagenet64_uncond_vlb_100M_1500K": dict(_IDDPM_IMAGENET, use_kl=True, step=1_500_000),
    "imagenet64_cond_270M_250K": dict(
      _IDDPM_IMAGENET,
      num_channels=192,
      class_cond=True,
      rescale_learned_sigmas=False,
      rescale_timesteps=False,
      step=250_000,
    ),
    "lsun_uncond_100M_1200K_bs128": dict(_IDDPM_LSUN, step=1_200_000),
    "lsun_uncond_100M_2400K_bs64": dict(_IDDPM_LSUN, step=2_400_000),
  },
  "guided": {
    "64x64_diffusion": dict(
      _ADM,
      class_cond=True,
      dropout=0.1,
      image_size=64,
      noise_schedule="cosine",
      num_channels=192,
      num_head_channels=64,
      num_res_blocks=3,
      use_new_attention_order=True,
      dataset="imagenet_resized/64x64",
    ),
    "128x128_diffusion": dict(_ADM, class_cond=True, image_size=128, num_heads=4),
    "256x256_diffusion": dict(_ADM, class_cond=True, image_size=256, num_head_channels=64),
    "256x256_diffusion_uncond": dict(_ADM, class_cond=False, image_size=256, num_head_channels=64),
    "lsun_bedroom": dict(_ADM_LSUN, dataset="lsun/bedroom"),
    "lsun_cat": dict(_ADM_LSUN, dataset="lsun/cat"),
    "lsun_horse": dict(_ADM_LSUN, dataset="lsun/horse"),
    "lsun_horse_nodropout": dict(_ADM_LSUN, dropout=0.0, dataset="lsun/horse"),
  },
}


def preset_flags(repo: str, preset: str | None) -> dict[str, Any]:
  """The flags of a released checkpoint of `repo` ("improved" or "guided"); {} for None."""
  if preset is None:
    return {}
  if preset not in PRESETS[repo]:
    raise ConvertError(
      f"unknown {repo}-diffusion preset {preset!r}; known: {sorted(PRESETS[repo])}"
    )
  return dict(PRESETS[repo][preset])


def repo_of_preset(preset: str) -> str | None:
  """ "improved" or "guided" when `preset` names a released checkpoint of that repo, else None."""
  return next((repo for repo, presets in PRESETS.items() if preset in presets), None)
