"""Config sections: dataclass defaults as an ml_collections section, and back to a dataclass.

Every section of a shipped config is built from its dataclass (`section`), so
each field the library knows can be overridden on the command line
(`--config.data.path=...`) whether or not the experiment's file sets it; the
launcher reads each section back as a typed, frozen dataclass (`from_mapping`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections
import numpy as np

T = TypeVar("T")


def from_mapping(cls: type[T], mapping: Any, section: str) -> T:
  """cls(**mapping) for a dict or ConfigDict; an unknown key is a ValueError naming `section.key`.

  Each room of the library gets its own small config this way, never the whole ConfigDict.
  """
  values = dict(mapping)
  check_known(values, field_names(cls), section)
  return cls(**values)


@dataclasses.dataclass(frozen=True)
class Range:
  """The finite numbers a numeric setting accepts: from `low` to `high`, each end open or closed."""

  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False

  def __contains__(self, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below

  def __str__(self) -> str:
    if self.high == math.inf:
      return f"{'>' if self.low_open else '>='} {self.low:g}"
    return (
      f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
      f"{')' if self.high_open else ']'}"
    )


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
UNIT_INTERVAL = Range(0, 1)
DECAY = Range(0, 1, high_open=True)  # a decay rate or probability below 1: [0, 1)


def check_ranges(config: Any, section: str, ranges: Mapping[str, Range]) -> None:
  """A ValueError naming `section.key` for the first field of `config` outside its range.

  Each frozen config section calls it from `__post_init__` with its table of
  ranges, so a NaN, an infinity or an impossible value stops the run before
  it starts. A field set to None (an optional setting left unset) is skipped.
  """
  for key, allowed in ranges.items():
    value = getattr(config, key)
    if value is not None and value not in allowed:
      raise ValueError(f"{section}.{key} must be a finite number {allowed}, got {value!r}.")


def field_names(cls: type) -> list[str]:
  """The fields of dataclass `cls` that a config sets (a Flax module's `parent` and `name` aside)."""
  names = [f.name for f in dataclasses.fields(cls)]
  if _is_flax_module(cls):
    names = [n for n in names if n not in ("parent", "name")]
  return names


def check_known(values: Mapping[str, Any], known, section: str) -> None:
  """A ValueError naming each key of `values` not in `known`, and the section's known keys."""
  if unknown := sorted(set(values) - set(known)):
    raise ValueError(
      f"Unknown config key(s) {[f'{section}.{k}' for k in unknown]};"
      f" known in '{section}': {sorted(known)}."
    )


def section(
  cls: type,
  values: Mapping[str, Any] | None = None,
  *,
  name: str,
  defaults: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
  """A config section holding every field of dataclass `cls`: `values` over its defaults.

  Args:
    cls: the section's dataclass (DataConfig, TrainConfig, a Flax module, ...).
    values: what the experiment's file sets; a key `cls` does not know is a
      ValueError naming it.
    name: the section's name, for errors ("train", "model", ...).
    defaults: defaults that replace the dataclass's own (a zoo entry's fields).

  Returns:
    A ConfigDict. A field whose value is None becomes a typed placeholder (the
    type read from its annotation), so the command line can still set it.
  """
  values = dict(values or {})
  check_known(values, field_names(cls), name)
  defaults = {**_defaults(cls), **(defaults or {})}
  hints = typing.get_type_hints(cls)
  config = ml_collections.ConfigDict()
  for key in field_names(cls):
    value = values.get(key, defaults.get(key))
    if dataclasses.is_dataclass(defaults.get(key)):  # a nested section, e.g. eval's `nll`
      nested = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
      value = section(type(defaults[key]), nested, name=f"{name}.{key}")
    elif value is None:
      value = ml_collections.config_dict.placeholder(_optional_type(hints[key]))
    config[key] = value
  return config


def _defaults(cls: type) -> dict[str, Any]:
  """{field: default} for the fields of `cls` that have one; dtypes as names ("float32")."""
  values = {}
  for f in dataclasses.fields(cls):
    if f.default is not dataclasses.MISSING:
      values[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      values[f.name] = f.default_factory()
  return {key: _config_value(value) for key, value in values.items()}


def _config_value(value: Any) -> Any:
  """A value as a config holds it: a dtype class (jnp.float32) by its name, else unchanged."""
  if isinstance(value, type) and hasattr(value, "dtype"):
    return np.dtype(value).name
  return value


def _optional_type(hint: Any) -> type:
  """T for a `T | None` annotation: the type a None-valued field takes from the command line."""
  args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
  if len(args) == 1:
    hint = args[0]
  origin = typing.get_origin(hint) or hint
  return origin if isinstance(origin, type) else object


def _is_flax_module(cls: type) -> bool:
  return any(
    base.__module__.startswith("flax.linen") and base.__name__ == "Module" for base in cls.__mro__
  )


def unknown_key(config: Mapping[str, Any], path: str) -> str | None:
  """An error message if dotted `path` ("model.dtype") is not a key of `config`, else None.

  It names the first missing key and the keys its section does know.
  """
  node, section_path = config, []
  for key in path.split("."):
    is_section = isinstance(node, (Mapping, ml_collections.ConfigDict))
    if not is_section or key not in node:
      section_name = ".".join(section_path) or "the config"
      known = sorted(node.keys()) if is_section else []
      return (
        f"Unknown config key '{'.'.join([*section_path, key])}'; known in"
        f" '{section_name}': {known}."
      )
    node = node[key]
    section_path.append(key)
  return None
