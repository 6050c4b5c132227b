"""Torch state dicts onto the zoo U-Net's Flax parameters: tensor layouts, name rules, key checks.

A converter writes `Rules`: for each Flax parameter path of `models.UNet`, the
torch key it comes from and the `Layout` that turns the torch tensor into the
Flax leaf. `assemble` then fills the Flax tree and checks the state dict
against it: every torch key missing, unexpected or of the wrong shape is
named in one `ConvertError`.

Layout conventions (PyTorch -> Flax):
  Conv2d weight [O, I, kh, kw]            -> Conv kernel [kh, kw, I, O]
  Linear weight [O, I] (or a 1x1 conv, [O, I, 1(, 1)])
                                          -> Dense(General) kernel [I..., O...]
  GroupNorm weight, bias [C]              -> scale, bias [C]
  attention heads: Flax's MultiHeadDotProductAttention keeps query/key/value
    kernels [C, heads, head_channels] and the output kernel [heads,
    head_channels, C]; torch keeps the heads flattened along one axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from diffusion_jax import weightfiles
from diffusion_jax.torch_layouts import CONV, FLAT, SAME, Layout, Shape, dense

_LISTED_KEYS = 20  # the most keys of one kind a message names


class ConvertError(ValueError):
  """A checkpoint does not fit the architecture read from it, or asks for one the zoo lacks."""


# An embedding table [N, E] -> [N + 1, E]: the zoo's extra null label (classifier-free
# guidance) gets a zero row, so y=None adds nothing to the timestep embedding.
WITH_NULL_LABEL = Layout(
  lambda s: (s[0] - 1, s[1]), lambda a, shape: np.concatenate([a, np.zeros((1, shape[1]), a.dtype)])
)


def qkv_part(part: int, legacy: bool) -> Layout:
  """One of q, k, v (part 0, 1, 2) from the fused Conv1d of openai's AttentionBlock.

  The Conv1d weight is [3 * heads * d, C, 1] (bias [3 * heads * d]). Its
  output channels are ordered (heads, 3, d) in the legacy order of
  improved-diffusion (QKVAttentionLegacy), (3, heads, d) in guided-diffusion's
  QKVAttention (`use_new_attention_order`). Flax: kernel [C, heads, d], bias [heads, d].
  """

  def source_shape(shape: Shape) -> Shape:
    if len(shape) == 3:  # kernel [C, heads, d]
      return (3 * shape[1] * shape[2], shape[0], 1)
    return (3 * math.prod(shape),)

  def convert(a: np.ndarray, shape: Shape) -> np.ndarray:
    heads, d = shape[-2:]
    a = a.reshape(a.shape[0], -1)  # [3 * heads * d, C] or [3 * heads * d, 1]
    a = a.reshape(heads, 3, d, -1)[:, part] if legacy else a.reshape(3, heads, d, -1)[part]
    return a.transpose(2, 0, 1).reshape(shape)  # [C or 1, heads, d]

  return Layout(source_shape, convert)


# Flax parameter path -> (torch key, layout).
Rules = dict[tuple[str, ...], tuple[str, Layout]]


def _path(target: str, leaf: str) -> tuple[str, ...]:
  return (*target.split("/"), leaf)


def conv(target: str, source: str) -> Rules:
  """A Conv2d (weight, bias) onto a Flax nn.Conv at `target` ("a/b" for nested modules)."""
  return {
    _path(target, "kernel"): (f"{source}.weight", CONV),
    _path(target, "bias"): (f"{source}.bias", SAME),
  }


def linear(target: str, source: str) -> Rules:
  """A Linear onto a Flax nn.Dense."""
  return {
    _path(target, "kernel"): (f"{source}.weight", dense()),
    _path(target, "bias"): (f"{source}.bias", SAME),
  }


def norm(target: str, source: str) -> Rules:
  """A GroupNorm onto the zoo's GroupNorm (scale, bias)."""
  return {
    _path(target, "scale"): (f"{source}.weight", SAME),
    _path(target, "bias"): (f"{source}.bias", SAME),
  }


def res_block(target: str, source: str, names: Mapping[str, str]) -> Rules:
  """A residual block onto layers.ResBlock; `names` gives the torch name of each of its parts.

  `names` maps norm1, conv1, emb_proj, norm2, conv2 and skip (the 1x1
  shortcut, present only when the channels change) to torch sub-module names.
  """
  rules = {
    **norm(f"{target}/norm1", f"{source}.{names['norm1']}"),
    **conv(f"{target}/conv1", f"{source}.{names['conv1']}"),
    **linear(f"{target}/emb_proj", f"{source}.{names['emb_proj']}"),
    **norm(f"{target}/norm2", f"{source}.{names['norm2']}"),
    **conv(f"{target}/conv2", f"{source}.{names['conv2']}"),
  }
  return {**rules, **conv(f"{target}/skip", f"{source}.{names['skip']}")}


def attention(target: str, source: str, names: Mapping[str, str], trailing: int = 0) -> Rules:
  """Separate q, k, v and output projections onto layers.AttentionBlock.

  `names` maps norm, query, key, value and out to torch sub-module names;
  `trailing` is 0 for Linear layers (diffusers), 2 for 1x1 Conv2d (pytorch_diffusion).
  """
  rules = norm(f"{target}/norm", f"{source}.{names['norm']}")
  for part in ("query", "key", "value"):
    rules[_path(f"{target}/attn/{part}", "kernel")] = (
      f"{source}.{names[part]}.weight",
      dense(1, trailing),
    )
    rules[_path(f"{target}/attn/{part}", "bias")] = (f"{source}.{names[part]}.bias", FLAT)
  rules[_path(f"{target}/attn/out", "kernel")] = (
    f"{source}.{names['out']}.weight",
    dense(2, trailing),
  )
  rules[_path(f"{target}/attn/out", "bias")] = (f"{source}.{names['out']}.bias", SAME)
  return rules


def assemble(rules: Rules, abstract_params: Any, state: Mapping[str, np.ndarray]) -> dict:
  """The Flax parameter tree of `abstract_params`' structure, filled from `state` by `rules`.

  Every leaf is float32. Rules whose Flax path the tree lacks are ignored
  (e.g. the shortcut of a block that keeps its channels); their torch keys
  then count as unexpected when present.

  Raises:
    ConvertError: naming every missing, unexpected and mis-shaped torch key.
  """
  flat = traverse_util.flatten_dict(abstract_params)
  unmapped = ["/".join(path) for path in flat if path not in rules]
  if unmapped:  # a converter bug, not a property of the file
    raise ConvertError(f"no torch tensor is mapped onto the parameter(s) {unmapped}")
  params, used, missing, misshaped = {}, set(), {}, {}
  for path, leaf in flat.items():
    key, layout = rules[path]
    used.add(key)
    expected = layout.source_shape(tuple(leaf.shape))
    if key not in state:
      missing[key] = f"{key} {expected}"
    elif tuple(state[key].shape) != expected:
      misshaped[key] = (
        f"{key} has shape {tuple(state[key].shape)}, expected {expected}"
        f" (for {'/'.join(path)} {tuple(leaf.shape)})"
      )
    else:
      params[path] = layout.convert(np.asarray(state[key], np.float32), tuple(leaf.shape))
  unexpected = quoted_keys(sorted(set(state) - used))
  problems = [
    f"{what} key(s): {items}"
    for what, items in (
      ("missing", ", ".join(missing.values())),
      ("unexpected", unexpected),
      ("mis-shaped", ", ".join(misshaped.values())),
    )
    if items
  ]
  if problems:
    raise ConvertError(
      "the checkpoint does not fit the architecture read from it: " + "; ".join(problems)
    )
  return traverse_util.unflatten_dict(params)


def quoted_keys(keys: list[str]) -> str:
  """Keys read from a file, each quoted (`weightfiles.quote`): the first _LISTED_KEYS, and a count."""
  shown = ", ".join(weightfiles.quote(key) for key in keys[:_LISTED_KEYS])
  return shown + (f" and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else "")


class StateDict(Mapping):
  """A flat {torch key: array} whose lookups name the missing key and what it was needed for."""

  def __init__(self, arrays: Mapping[str, np.ndarray], origin: str):
    self._arrays = dict(arrays)
    self.origin = origin

  def __getitem__(self, key: str) -> np.ndarray:
    return self._arrays[key]

  def __iter__(self):
    return iter(self._arrays)

  def __len__(self) -> int:
    return len(self._arrays)

  def shape(self, key: str, purpose: str = "the architecture") -> Shape:
    """The shape of tensor `key`; a ConvertError names it when it is absent."""
    if key not in self._arrays:
      raise ConvertError(f"{self.origin}: missing key {key} (needed to read {purpose})")
    return tuple(self._arrays[key].shape)

  def indices(self, prefix: str) -> list[int]:
    """The sorted integers i of the keys `prefix.i.*` (e.g. the blocks of a ModuleList)."""
    found = {
      int(key[len(prefix) + 1 :].split(".")[0])
      for key in self._arrays
      if key.startswith(prefix + ".") and key[len(prefix) + 1 :].split(".")[0].isdigit()
    }
    return sorted(found)

  def has_prefix(self, prefix: str) -> bool:
    return any(key.startswith(prefix + ".") for key in self._arrays)
