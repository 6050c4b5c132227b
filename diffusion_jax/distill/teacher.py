"""The frozen teacher of a distillation run: a finished diffusion run read from its workdir.

Its EMA parameters initialise the student, so the student's `model` section
must build the teacher's parameter tree, and its `diffusion` section must
share the keys that make the teacher's network mean the same to the student
(progressive distillation: the whole process but what the network predicts;
consistency distillation: EDM's sigma_data, which scales its inputs).
"""

from __future__ import annotations

import json

import ml_collections

from diffusion_jax import runs
from diffusion_jax.sampling import denoisers
from diffusion_jax.sampling.denoisers import Denoiser
from diffusion_jax.config import models
from diffusion_jax.config.diffusion import DiffusionConfig
from diffusion_jax.configlib import from_mapping

# model fields a student may set apart from its teacher: they change no parameter
# (Salimans & Ho's CIFAR-10 student drops the teacher's dropout).
FREE_MODEL_KEYS = frozenset({"dropout", "dtype", "remat"})
# diffusion fields a progressive student shares: the process the teacher's DDIM steps follow.
PROGRESSIVE_SHARED_KEYS = (
  "schedule",
  "num_timesteps",
  "var_type",
  "clip_x0",
  "rescale_timesteps",
  "parameterization",
)
CONSISTENCY_SHARED_KEYS = ("sigma_data",)  # c_in of the network the student starts from


def check_student_fits(
  teacher: ml_collections.ConfigDict,
  student: ml_collections.ConfigDict,
  teacher_workdir: str,
  shared_keys: tuple[str, ...],
) -> None:
  """A ValueError naming every model or diffusion key where the student cannot be the teacher's."""
  models_ = [_plain(models.model_section(config.model)) for config in (teacher, student)]
  differ = [
    (f"model.{key}", models_[0].get(key), models_[1].get(key))
    for key in sorted(set(models_[0]) | set(models_[1]))
    if key not in FREE_MODEL_KEYS and models_[0].get(key) != models_[1].get(key)
  ]
  processes = [
    from_mapping(DiffusionConfig, config.diffusion, "diffusion") for config in (teacher, student)
  ]
  differ += [
    (f"diffusion.{key}", getattr(processes[0], key), getattr(processes[1], key))
    for key in shared_keys
    if getattr(processes[0], key) != getattr(processes[1], key)
  ]
  if differ:
    raise ValueError(
      f"The student's config differs from its teacher's ({teacher_workdir}) in"
      f" {', '.join(f'{key}: {old!r} -> {new!r}' for key, old, new in differ)};"
      " the student starts from the teacher's parameters on the teacher's process."
    )


def _plain(section: ml_collections.ConfigDict) -> dict:
  """The section as config.json holds it (tuples as lists): a saved one compares with a new one."""
  return json.loads(section.to_json_best_effort())


def load(
  teacher_workdir: str, student: ml_collections.ConfigDict, shared_keys: tuple[str, ...]
) -> runs.EmaModel:
  """The teacher's EMA model at its latest checkpoint, checked against the `student` config.

  `shared_keys` are the diffusion fields the two must agree on.

  Raises:
    FileNotFoundError: the workdir has no config.json or no checkpoint.
    ValueError: it is not a diffusion run, or the student does not fit it.
  """
  if not teacher_workdir:
    raise ValueError(
      "distill.teacher_workdir is empty: name the workdir of a finished"
      " diffusion run (e.g. workdirs/digits)."
    )
  teacher_config = runs.load_run_config(teacher_workdir)
  if teacher_config.get("task", "diffusion") != "diffusion":
    raise ValueError(
      f"distill.teacher_workdir={teacher_workdir} holds a"
      f" {teacher_config.task} run, not a diffusion model."
    )
  check_student_fits(teacher_config, student, teacher_workdir, shared_keys)
  return runs.load_ema_for_sampling(teacher_workdir)


def denoiser(teacher: runs.EmaModel, params, labels=None) -> Denoiser:
  """The teacher with `params` as D(x; sigma): its EDM network, or its discrete-time model."""
  model_fn = lambda x, t: teacher.apply_fn(params, x, t, labels)
  if teacher.spec.edm:
    return denoisers.from_edm(model_fn, teacher.spec)
  return denoisers.from_discrete(model_fn, teacher.spec, teacher.schedule)
