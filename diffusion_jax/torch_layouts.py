"""How a PyTorch tensor becomes a Flax leaf: the layouts every torch weight importer shares.

PyTorch keeps a Conv2d weight as [O, I, kh, kw] and a Linear weight as
[O, I]; Flax keeps a Conv kernel as [kh, kw, I, O] and a Dense kernel as
[I, O]. The zoo converters (`convert/mapping.py`) and the loaders of the FID
Inception and LPIPS (`evaluation/inception.py`, `evaluation/lpips.py`) all map
through these; the two loaders fill their trees with `flax_leaves`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import numpy as np

from diffusion_jax import weightfiles

Shape = tuple[int, ...]
_LISTED_PROBLEMS = 20  # the most problems one message names


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one torch tensor becomes one Flax leaf.

  Attributes:
    source_shape: the torch shape that a Flax leaf of the given shape needs.
    convert: (torch array, Flax shape) -> the Flax leaf.
  """

  source_shape: Callable[[Shape], Shape]
  convert: Callable[[np.ndarray, Shape], np.ndarray]


SAME = Layout(lambda shape: shape, lambda a, shape: a)
CONV = Layout(lambda s: (s[3], s[2], s[0], s[1]), lambda a, shape: a.transpose(2, 3, 1, 0))
# A bias [heads * head_channels] of the query, key or value projection -> [heads, head_channels].
FLAT = Layout(lambda s: (math.prod(s),), lambda a, shape: a.reshape(shape))


def dense(in_dims: int = 1, trailing: int = 0) -> Layout:
  """torch weight [out, in, 1 x trailing] -> Flax kernel [*in_shape, *out_shape].

  The Flax kernel's first `in_dims` axes are its inputs: 1 for Dense and the
  query/key/value projections ([C, heads, head_channels]), 2 for the attention
  output ([heads, head_channels, C]). `trailing` counts the unit axes of a 1x1
  Conv1d (1) or Conv2d (2) used as a linear map.
  """

  def source_shape(shape: Shape) -> Shape:
    return (math.prod(shape[in_dims:]), math.prod(shape[:in_dims])) + (1,) * trailing

  return Layout(source_shape, lambda a, shape: a.reshape(a.shape[0], -1).T.reshape(shape))


# Where a torch tensor goes: (the Flax leaf's path, its shape, the layout between them).
Target = tuple[tuple[str, ...], Shape, Layout]


def flax_leaves(
  targets: Mapping[str, Target], state_dict: Mapping[str, np.ndarray]
) -> dict[tuple[str, ...], np.ndarray]:
  """{Flax path: float32 leaf}: each tensor `state_dict[key]` through `targets[key]`'s layout.

  Args:
    targets: {torch key: (Flax path, Flax shape, layout)}, one per leaf of the tree.
    state_dict: {torch key: array}, e.g. from `weightfiles.load`.

  Raises:
    ValueError: one line naming every unexpected key (quoted: it was read from
      a file), every key whose shape is not its layout's source shape (expected
      vs got) and every missing key, in that order; the first 20 of them, and a
      count of the rest.
  """
  shape_of = {key: layout.source_shape(shape) for key, (_, shape, layout) in targets.items()}
  problems = [
    f"unexpected key {weightfiles.quote(key)}" for key in state_dict if key not in targets
  ]
  problems += [
    f"wrong shape for {key}: expected {shape_of[key]}, got {np.shape(state_dict[key])}"
    for key in targets
    if key in state_dict and np.shape(state_dict[key]) != shape_of[key]
  ]
  problems += [f"missing key {key}" for key in targets if key not in state_dict]
  if problems:
    more = len(problems) - _LISTED_PROBLEMS
    raise ValueError(
      "; ".join(problems[:_LISTED_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
    )
  return {
    path: layout.convert(np.asarray(state_dict[key], np.float32), shape)
    for key, (path, shape, layout) in targets.items()
  }
