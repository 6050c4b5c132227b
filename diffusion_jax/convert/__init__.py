"""Published PyTorch diffusion checkpoints as zoo models, checked against the original code.

    from diffusion_jax import convert
    model = convert.load("ddpm-cifar10-32")   # an EmaModel, as runs.py gives for our runs
    model = convert.load("cifar10_uncond_50M_500K.pt")  # the preset is told by the file name
    model = convert.load("model.pt", format="guided_diffusion", image_size=64, num_head_channels=64)
    convert.write_workdir(convert.convert(path), "workdirs/hub")  # what launch.convert does

Formats (FORMATS), one module each:
  diffusers            a UNet2DModel directory (config.json + weights); diffusers_unet.py
  improved_diffusion   openai/improved-diffusion UNetModel state dicts; openai_unet.py
  guided_diffusion     openai/guided-diffusion UNetModel state dicts; openai_unet.py
  pytorch_diffusion    pesser/pytorch_diffusion Model state dicts; pytorch_diffusion.py
Files are read by `weightfiles` (safetensors, torch zip and legacy files,
without torch and without running any code a pickle names).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from diffusion_jax import files, weightfiles
from diffusion_jax.convert import diffusers_unet, openai_flags, openai_unet, pytorch_diffusion
from diffusion_jax.convert.converted import Converted
from diffusion_jax.convert.mapping import ConvertError, StateDict, quoted_keys
from diffusion_jax.convert.workdir import RECORD_FILE, ema_model, write_workdir

FORMATS: dict[str, Callable[..., Converted]] = {
  "diffusers": diffusers_unet.convert,
  "improved_diffusion": functools.partial(openai_unet.convert, repo="improved"),
  "guided_diffusion": functools.partial(openai_unet.convert, repo="guided"),
  "pytorch_diffusion": pytorch_diffusion.convert,
}
# A key only each format's state dicts have.
_SIGNATURES = {
  "input_blocks.0.0.weight": "openai",
  "temb.dense.0.weight": "pytorch_diffusion",
  "time_embedding.linear_1.weight": "diffusers",
}


def convert(
  path: str, format: str | None = None, preset: str | None = None, **flags: Any
) -> Converted:
  """Reads the checkpoint at `path` into a `Converted` (zoo U-Net fields, process, parameters).

  Args:
    path: a diffusers directory, or a .pt / .ckpt / .bin / .safetensors file.
    format: one of FORMATS; told from the content when None (an openai file
      needs it, or a preset, since improved- and guided-diffusion differ in
      their defaults).
    preset: a released checkpoint's settings (openai_flags.PRESETS,
      pytorch_diffusion.PRESETS); for openai files, the file name when it is one.
    **flags: the source's own flags (see its module), e.g. image_size=32.

  Raises:
    ConvertError: an unsupported architecture or setting, or keys that do not fit; named.
    weightfiles.UnsafeWeightFileError: the file's pickle would run code.
  """
  if format is not None and format not in FORMATS:
    raise ConvertError(f"unknown format {format!r}; known: {sorted(FORMATS)}")
  if files.is_dir(path):
    if format not in (None, "diffusers"):
      raise ConvertError(f"{path} is a directory: only the diffusers format is one")
    return diffusers_unet.convert(path, preset, flags)
  state = StateDict(weightfiles.load(path), path)
  detected = next((kind for key, kind in _SIGNATURES.items() if key in state), None)
  if detected == "diffusers":
    raise ConvertError(
      f"{path} holds diffusers UNet2DModel weights: convert the directory"
      " holding it and its config.json"
    )
  if detected is None:
    raise ConvertError(
      f"{path}: not a checkpoint of {sorted(FORMATS)}; its first keys are"
      f" {quoted_keys(sorted(state)[:5])}"
    )
  if detected == "openai":
    format, preset = _openai_format(path, format, preset)
  elif format not in (None, detected):
    raise ConvertError(f"{path} holds a {detected} state dict, not {format}")
  return FORMATS[format or detected](path, preset=preset, flags=flags, state=state)


def _openai_format(path: str, format: str | None, preset: str | None) -> tuple[str, str | None]:
  """(improved_diffusion or guided_diffusion, preset) from the arguments or the file name."""
  if format not in (None, "improved_diffusion", "guided_diffusion"):
    raise ConvertError(f"{path} holds an openai UNetModel state dict, not {format}")
  if preset is None:
    stem = files.path(path).stem
    preset = stem if openai_flags.repo_of_preset(stem) else None
  repo = openai_flags.repo_of_preset(preset) if preset else None
  if format is None and repo is None:
    raise ConvertError(
      f"{path} holds an openai UNetModel state dict: say format"
      " improved_diffusion or guided_diffusion (their rescale_timesteps defaults"
      " differ), or a preset"
    )
  if format and repo and format != f"{repo}_diffusion":
    raise ConvertError(f"preset {preset!r} is a {repo}_diffusion checkpoint, not {format}")
  return format or f"{repo}_diffusion", preset


def parse_source_flags(argv: list[str]) -> dict[str, str]:
  """README-style ["--name", "value", ...] or ["--name=value", ...] -> {name: value} (strings).

  The source's flags as its README writes them; `convert` types them as the source does.
  """
  flags, i = {}, 0
  while i < len(argv):
    name, eq, value = argv[i].removeprefix("--").partition("=")
    if not argv[i].startswith("--") or not name or (not eq and i + 1 >= len(argv)):
      raise ConvertError(f"expected --name value or --name=value, got {argv[i:]}")
    if not eq:
      value, i = argv[i + 1], i + 1
    flags[name] = value
    i += 1
  return flags


def load(path: str, format: str | None = None, preset: str | None = None, **flags: Any):
  """The checkpoint at `path` as a runs.EmaModel (params replicated over all devices)."""
  return ema_model(convert(path, format, preset, **flags))


__all__ = [
  "FORMATS",
  "RECORD_FILE",
  "ConvertError",
  "Converted",
  "convert",
  "load",
  "parse_source_flags",
  "write_workdir",
]
