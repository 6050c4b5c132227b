"""Turning a section of an ml_collections config into a typed, frozen dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], mapping: Any, section: str) -> T:
  """cls(**mapping) for a dict or ConfigDict; an unknown key is a ValueError naming `section.key`.

  Each room of the library gets its own small config this way, never the whole ConfigDict.
  """
  values = dict(mapping)
  known = {f.name for f in dataclasses.fields(cls)}
  if unknown := sorted(set(values) - known):
    raise ValueError(f"Unknown config key(s) {[f'{section}.{k}' for k in unknown]};"
                     f" known in '{section}': {sorted(known)}.")
  return cls(**values)
