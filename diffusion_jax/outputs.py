"""Where a program may write: never onto its inputs, never over files that another run wrote.

    outputs.check_apart(output_dir, [input_folder, weights_file])   # not equal, inside, around
    outputs.check_unclaimed(paths_this_run_writes, overwrite=flag)  # nothing there yet
    resuming = outputs.claim(folder, settings, paths_this_run_writes, overwrite=flag)

Every launcher that writes into a folder the user names (sample, evaluate,
segment, convert) checks it with these before writing anything.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from diffusion_jax import files

OVERWRITE_FLAG = "--overwrite"
CLAIM_FILE = "settings.json"  # written into a claimed folder before anything else


class OutputConflictError(ValueError):
  """An output would overwrite or mix with an input, or replace a file this run did not write."""


def _resolved(path: str | os.PathLike) -> pathlib.PurePath:
  """`path` absolute, links resolved; a URL (gs://...) as written, without a trailing slash."""
  if not files.is_local(path):
    return pathlib.PurePosixPath(os.fspath(path).rstrip("/"))
  return pathlib.Path(path).resolve()


def check_apart(
  output_dir: str | os.PathLike,
  inputs: Iterable[str | os.PathLike | None],
  what: str = "output folder",
) -> None:
  """Refuses an output folder equal to, inside or containing any of `inputs` (files or folders).

  None or "" entries (an input that is not given) are skipped.

  Raises:
    OutputConflictError: naming the output folder, the input and how they overlap.
  """
  output = _resolved(output_dir)
  for given in inputs:
    if not given:
      continue
    source = _resolved(given)
    if output == source:
      relation = "is"
    elif output.is_relative_to(source):
      relation = "is inside"
    elif source.is_relative_to(output):
      relation = "contains"
    else:
      continue
    raise OutputConflictError(
      f"{what} {os.fspath(output_dir)!r} {relation} the input"
      f" {os.fspath(given)!r}: pick a folder apart from the inputs"
    )


def check_unclaimed(paths: Iterable[str | os.PathLike], *, overwrite: bool) -> None:
  """Refuses, unless `overwrite`, when any of `paths` (what this run would write) exists.

  Call it before writing: a file there now was written by someone else.

  Raises:
    OutputConflictError: naming the first existing path and how many others exist.
  """
  if overwrite:
    return
  existing = [os.fspath(path) for path in paths if files.exists(path)]
  if existing:
    others = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
    raise OutputConflictError(
      f"{existing[0]!r}{others} already exists and this run did not"
      f" write it: pass {OVERWRITE_FLAG} to replace it, or pick another"
      " output folder"
    )


def claim(
  folder: str | os.PathLike,
  settings: Mapping[str, Any],
  paths: Iterable[str | os.PathLike],
  *,
  overwrite: bool,
) -> bool:
  """Whether `folder` holds the earlier outputs of a run with `settings`; if not, claims it.

  FOLDER/settings.json, written before anything else, says whose files the
  folder holds: equal settings are this run's (it resumes, True); other
  settings, or none beside any of `paths` (what this run would write), are
  another run's, refused unless `overwrite`. A folder that is not this run's
  is claimed by saving `settings` (JSON-able) there (False).

  Raises:
    OutputConflictError: naming the settings file or the first existing path.
  """
  path = files.join(folder, CLAIM_FILE)
  settings = json.loads(json.dumps(settings))  # as read back: lists for tuples
  if files.exists(path):
    previous = files.read_json(path)
    if previous == settings:
      return True
    if not overwrite:
      raise OutputConflictError(
        f"{path} holds the settings of another run: use a new output folder, the same"
        f" settings, or {OVERWRITE_FLAG}; they differ in {'; '.join(_changes(previous, settings))}"
      )
  else:
    check_unclaimed(paths, overwrite=overwrite)
  files.write_json(path, settings, indent=2, sort_keys=True)
  return False


def _changes(old: Any, new: Any, key: str = "") -> list[str]:
  """'key old → new' for each value that differs between two JSON values, dicts key by key."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [
      change
      for name in sorted(old.keys() | new.keys())
      for change in _changes(old.get(name), new.get(name), f"{key}.{name}".lstrip("."))
    ]
  return [] if old == new else [f"{key} {old!r} → {new!r}"]
