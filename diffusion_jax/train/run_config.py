"""What a resumed run may change in its config, and the record of what it changed.

A workdir holds one run, and its config.json says what that run trains.
Rerunning training on the workdir with another config compares the two field
by field before anything is written. Each field follows a rule (RESUME_RULES, with
the rows of the run's task: its `resume_rules`):

- FIXED_BY_CHECKPOINT: how the checkpoint's arrays are read and what they mean
  (the model, the diffusion process, the optimizer's type);
- FIXED_BY_RUN: what the run trains on once it has trained (the data, the seed,
  the batch size, the EMA decay, the label dropout);
- MAY_CHANGE: how long to train, how often to log, sample, checkpoint and
  evaluate, the device layout, the learning-rate schedule, ...

Which fixed fields refuse a change depends on what the latest checkpoint
holds: a trained run's (it saved a data position) fixes both kinds; weights
only (launch.convert's, to fine-tune) fix the first; no checkpoint, none.
A refused change raises `ConfigChangeError` naming every such field,
old → new. Otherwise config.json is updated and config_history.jsonl in the
workdir gets one line per resume that changed something: the step, the time
and each changed field's old and new value.

A field present on one side only (a field added to the code since the run
started) is compared with its default, so a new field at its default value is
no change. Everything but `check_resume` and `record_resume` is pure.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections

from diffusion_jax import checkpoint, configlib, files
from diffusion_jax.config import diffusion, distill, models, segmentation

HISTORY_FILE = "config_history.jsonl"

FIXED_BY_CHECKPOINT = "fixed by the checkpoint"
FIXED_BY_RUN = "fixed by the run"
MAY_CHANGE = "may change"
# The rules of the sections every task has; each task adds its own rows (`Task.resume_rules`).
# A dotted key follows its longest listed prefix ("model.remat" before "model"); an unlisted
# section is fixed by the checkpoint.
RESUME_RULES: dict[str, str] = {
  "model": FIXED_BY_CHECKPOINT,  # the network and its parameter tree, its compute dtype too
  "model.remat": MAY_CHANGE,  # recomputes activations: less memory, the same numbers
  "model.attention_impl": MAY_CHANGE,  # how attention is computed, not its parameters
  "optim": MAY_CHANGE,  # the schedule and its constants: a deliberate change, recorded
  "optim.optimizer": FIXED_BY_CHECKPOINT,  # Adam and AdamW keep differently structured states
  "seed": FIXED_BY_RUN,  # the initial parameters, the data order and every step's noise
  "data": FIXED_BY_RUN,  # the examples, their preparation and their order
  "data.num_threads": MAY_CHANGE,  # how many threads prepare the same batches
  "train": MAY_CHANGE,  # how long, how often to log / sample / checkpoint / evaluate, layout
  "train.batch_size": FIXED_BY_RUN,  # the batches, and so the saved data position
  "train.ema_decay": FIXED_BY_RUN,  # what the EMA parameters average
}

# What a workdir's latest checkpoint holds -> the rules whose fields it fixes.
FIXED_WHEN = {
  "a trained run": (FIXED_BY_CHECKPOINT, FIXED_BY_RUN),  # it saved a data position
  "weights": (FIXED_BY_CHECKPOINT,),  # no data position: launch.convert's, to fine-tune
  "no checkpoint": (),
}

# Each task's sections whose defaults are a dataclass's (the model's come from the zoo).
SECTION_DATACLASSES = {
  "diffusion": diffusion.SECTION_CLASSES,
  "segmentation": segmentation.SECTION_CLASSES,
  **distill.SECTION_CLASSES,
}

UNSET = "(unset)"  # the value of a field present in one config only, without a known default


class ConfigChangeError(ValueError):
  """The config of a resumed run changes fields that its checkpoint fixes."""


class Change(NamedTuple):
  """One field whose value differs between the saved config and the new one."""

  key: str  # dotted, e.g. "model.ch"
  old: Any  # a JSON value, or UNSET
  new: Any

  def __str__(self) -> str:
    return f"{self.key} {_show(self.old)} → {_show(self.new)}"


def _show(value: Any) -> str:
  return value if value is UNSET else json.dumps(value)


def rule(key: str, rules: Mapping[str, str] = RESUME_RULES) -> str:
  """The rule of a dotted key: that of its longest prefix in `rules`."""
  parts = key.split(".")
  for end in range(len(parts), 0, -1):
    if (prefix := ".".join(parts[:end])) in rules:
      return rules[prefix]
  return FIXED_BY_CHECKPOINT


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"model": {"ch": 64}} -> {"model.ch": 64}; lists and other values are leaves."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def default_values(model_name: str | None, task: str = "diffusion") -> dict[str, Any]:
  """Each field's default by dotted key, as config.json holds it (a dtype by its name).

  The defaults of `task`'s sections' dataclasses, and the zoo entry's for model
  `model_name` (a factory, "package.module:factory", has no known defaults).
  """
  sections = {
    name: configlib.section(cls, name=name) for name, cls in SECTION_DATACLASSES[task].items()
  }
  if model_name in models.ZOO_SETTINGS:
    sections["model"] = models.model_section({"name": model_name})
  return flatten(json.loads(ml_collections.ConfigDict(sections).to_json_best_effort()))


def changes(
  saved: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any]
) -> list[Change]:
  """The fields whose values differ between two flat configs, sorted by key.

  A key missing on one side takes its value from `defaults`, or UNSET.
  """
  found = []
  for key in sorted(set(saved) | set(new)):
    old = saved.get(key, defaults.get(key, UNSET))
    value = new.get(key, defaults.get(key, UNSET))
    if old != value:
      found.append(Change(key, old, value))
  return found


def refused_changes(
  found: list[Change], holds: str, rules: Mapping[str, str] = RESUME_RULES
) -> list[Change]:
  """The changes of fields fixed when the checkpoint holds `holds` (a key of FIXED_WHEN)."""
  return [change for change in found if rule(change.key, rules) in FIXED_WHEN[holds]]


def refusal_message(workdir: str, holds: str, refused: list[Change]) -> str:
  """One line naming every refused change and what to do instead."""
  return (
    f"Cannot resume {workdir}: the config changes fields that its checkpoint ({holds})"
    f" fixes: {', '.join(map(str, refused))}. Start a new workdir, or rerun with the"
    f" values in {files.join(workdir, checkpoint.CONFIG_FILE)}; nothing was written."
  )


def history_entry(step: int, found: list[Change], time: datetime.datetime) -> dict[str, Any]:
  """A line of config_history.jsonl: {"step", "time", "changes": {key: [old, new]}}."""
  return {
    "step": step,
    "time": time.isoformat(timespec="seconds"),
    "changes": {change.key: [change.old, change.new] for change in found},
  }


def what_checkpoint_holds(checkpointer: checkpoint.Checkpointer) -> str:
  """The key of FIXED_WHEN that describes the latest checkpoint."""
  step = checkpointer.latest_step()
  if step is None:
    return "no checkpoint"
  return "a trained run" if checkpointer.data_process_counts(step) else "weights"


def check_resume(
  config: ml_collections.ConfigDict,
  workdir: str,
  checkpointer: checkpoint.Checkpointer,
  task_rules: Mapping[str, str],
) -> list[Change]:
  """The changes from `workdir`'s saved config to `config`; reads, never writes.

  Returns [] for a new workdir. `task_rules` are the run's task's rows of the
  rules (`Task.resume_rules`), over RESUME_RULES.

  Raises:
    ConfigChangeError: a field fixed by what the checkpoint holds changed
      (every one is named, old → new).
  """
  path = files.join(workdir, checkpoint.CONFIG_FILE)
  if not files.exists(path):
    return []
  saved = flatten(files.read_json(path))
  new = flatten(json.loads(config.to_json_best_effort()))
  defaults = default_values(
    new.get("model.name", saved.get("model.name")), config.get("task", "diffusion")
  )
  found = changes(saved, new, defaults)
  holds = what_checkpoint_holds(checkpointer)
  if refused := refused_changes(found, holds, {**RESUME_RULES, **task_rules}):
    raise ConfigChangeError(refusal_message(workdir, holds, refused))
  return found


def record_resume(
  config: ml_collections.ConfigDict, workdir: str, found: list[Change], step: int
) -> None:
  """Writes config.json, and appends `found` (when any) to the history (process 0 only)."""
  if jax.process_index() != 0:
    return
  checkpoint.save_config(config, workdir)
  if found:
    entry = history_entry(step, found, datetime.datetime.now(datetime.timezone.utc))
    files.append_line(files.join(workdir, HISTORY_FILE), json.dumps(entry))
