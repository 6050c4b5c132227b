"""How a PyTorch tensor becomes a Flax leaf: the layouts every torch weight importer shares.

PyTorch keeps a Conv2d weight as [O, I, kh, kw] and a Linear weight as
[O, I]; Flax keeps a Conv kernel as [kh, kw, I, O] and a Dense kernel as
[I, O]. The zoo converters (`convert/mapping.py`) and the FID Inception's
loader (`evaluation/inception.py`) both map through these.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

Shape = tuple[int, ...]


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
