"""Every shipped config holds every field its sections know, and the command line can set any.

Configs are built from the sections' dataclasses (`config.diffusion.complete_config`,
`config.evaluation.complete_config`), so a field no config file mentions is still
a key that `--config.SECTION.FIELD=...` overrides.
"""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from configs import digits, segmentation_cells
from configs.eval import digits as eval_digits
from diffusion_jax import configlib, models
from diffusion_jax.config import diffusion as diffusion_config
from diffusion_jax.config import evaluation as eval_config
from diffusion_jax.config import models as model_settings
from diffusion_jax.config import sampler as sampler_config
from diffusion_jax.config import segmentation as segmentation_config
from diffusion_jax.config.data import DataConfig
from diffusion_jax.config.evaluation import EvalConfig, NllConfig, NllOdeConfig
from diffusion_jax.train import run_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(
  p.name for p in (REPO / "configs").glob("*.py") if p.name not in ("__init__.py", "smoke.py")
)
EVAL_CONFIGS = sorted(
  p.name for p in (REPO / "configs" / "eval").glob("*.py") if p.name != "__init__.py"
)
# Each section's dataclass: the fields its config section must hold.
EVAL_SECTIONS = {"": EvalConfig, "nll": NllConfig, "nll_ode": NllOdeConfig, "data": DataConfig}


def _train_sections(config) -> dict:
  """The sections of a training config: its task's (diffusion's, segmentation's, ...)."""
  return run_config.SECTION_DATACLASSES[config.get("task", "diffusion")]


def _config_text(path: str) -> str:
  """The text of config file `path` and of the config files it builds on."""
  text = (REPO / path).read_text()
  parents = re.findall(r"^from (configs(?:\.eval)?) import (.+)$", text, re.MULTILINE)
  return "\n".join(
    [
      text,
      *(
        _config_text(f"{package.replace('.', '/')}/{name.strip()}.py")
        for package, names in parents
        for name in names.split(",")
      ),
    ]
  )


def _load(path: str):
  module = {}
  exec(compile((REPO / path).read_text(), path, "exec"), module)  # as config_flags loads it
  return module["get_config"]()


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_train_config_holds_every_field_of_its_sections(name):
  config = _load(f"configs/{name}")
  for section, cls in _train_sections(config).items():
    assert sorted(config[section].keys()) == sorted(configlib.field_names(cls)), section
  module = models.lookup(config.model.name).module
  assert sorted(config.model.keys()) == sorted([*configlib.field_names(module), "name"])


@pytest.mark.parametrize("name", EVAL_CONFIGS)
def test_eval_config_holds_every_field_of_its_sections(name):
  config = _load(f"configs/eval/{name}")
  for section, cls in EVAL_SECTIONS.items():
    keys = config[section].keys() if section else set(config.keys()) - {"samplers"}
    expected = set(configlib.field_names(cls)) - ({"samplers"} if not section else set())
    assert set(keys) == expected, section


def test_completing_keeps_what_the_file_sets_and_is_idempotent():
  from configs import cifar10_iddpm

  config = cifar10_iddpm.get_config()
  assert config.model.name == "iddpm_cifar10" and config.model.dropout == 0.3
  assert config.model.ch_mult == models.lookup("iddpm_cifar10").kwargs["ch_mult"]
  assert config.diffusion.num_timesteps == 4000 and config.diffusion.clip_x0  # a default
  assert config.train.label_dropout is None  # a typed placeholder the command line can set
  assert diffusion_config.complete_config(config).to_dict() == config.to_dict()


def test_unknown_key_in_a_config_file_is_named():
  from configs import cifar10_ddpm

  raw = cifar10_ddpm.base()
  raw.train.batch_sise = 4
  with pytest.raises(ValueError, match=r"train\.batch_sise.*known in 'train'.*batch_size"):
    diffusion_config.complete_config(raw)


def _override_value(value, field_type):
  """A command-line value of the field's type that differs from `value`, or None to skip."""
  if field_type is bool:
    return str(not value)
  if field_type in (int, float):
    return str((value or 0) + 3)
  if field_type is str:
    return (value or "") + "x"
  return None  # tuples: parsed too, but a scalar shows the point


def _unset_field_overrides(path, sections):
  """{key: value}: one field per section, one that config file `path` does not set if any."""
  config, text = _load(path), _config_text(path)
  overrides = {}
  for section in sections:
    node = config[section] if section else config
    candidates = {
      key: value
      for key in sorted(node.keys())
      if key != "name"
      if (value := _override_value(node[key], node.get_type(key))) is not None
    }
    unset = [key for key in candidates if not re.search(rf"\b{key}\s*=", text)]
    key = (unset or list(candidates))[0]
    overrides[f"{section}.{key}" if section else key] = candidates[key]
  return overrides


_PARSE = """
import json, sys
from absl import flags
from ml_collections import config_flags
results = {}
for path, overrides in json.loads(sys.argv[1]).items():
  argv = ["prog", f"--config={path}", *[f"--config.{k}={v}" for k, v in overrides.items()]]
  flag_values = flags.FlagValues()  # what launch.train / launch.evaluate define, afresh
  config = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                           lock_config=True, sys_argv=argv)
  flag_values(argv)
  results[path] = {k: str(config.value[k.split(".")[0]][k.split(".")[1]] if "." in k
                          else config.value[k]) for k in overrides}
print(json.dumps(results))
"""


def test_command_line_overrides_a_field_of_every_section_no_config_sets():
  """In a subprocess, as the launchers parse flags; the fields are chosen by the test."""
  requests = {
    f"configs/{name}": _unset_field_overrides(
      f"configs/{name}", [*_train_sections(_load(f"configs/{name}")), "model"]
    )
    for name in TRAIN_CONFIGS
  }
  requests.update(
    {
      f"configs/eval/{name}": _unset_field_overrides(f"configs/eval/{name}", list(EVAL_SECTIONS))
      for name in EVAL_CONFIGS
    }
  )
  requests["configs/digits.py"].update(
    {  # None-valued (typed placeholder) fields; the README's
      "train.label_dropout": "0.25",
      "model.num_classes": "10",  # bf16 and remat switches
      "model.dtype": "bfloat16",
      "model.remat": "True",
    }
  )
  result = subprocess.run(
    [sys.executable, "-c", _PARSE, json.dumps(requests)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  parsed = json.loads(result.stdout.strip().splitlines()[-1])
  for path, overrides in requests.items():
    for key, value in overrides.items():
      assert parsed[path][key].lower() == value.lower(), (path, key)
  assert len(parsed) == len(TRAIN_CONFIGS) + len(EVAL_CONFIGS)


@pytest.mark.parametrize(
  "override, message, a_known_key",
  [
    (
      "--config.model.dtyp=bfloat16",
      "Unknown config key 'model.dtyp'; known in 'model'",
      "'dtype'",
    ),
    ("--config.trian.num_steps=3", "Unknown config key 'trian'; known in 'the config'", "'train'"),
  ],
)
def test_unknown_override_is_one_line(override, message, a_known_key):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.train",
      "--config=configs/digits.py:smoke",
      "--workdir=/nonexistent/never-written",
      override,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("launch.train: flags:")]
  assert len(errors) == 1 and message in errors[0] and a_known_key in errors[0]


@pytest.mark.parametrize(
  "section,key,value,expected",
  [
    ("optim", "lr", float("nan"), "a finite number > 0, got nan"),
    ("optim", "lr", 0.0, "a finite number > 0, got 0.0"),
    ("optim", "lr", float("inf"), "a finite number > 0, got inf"),
    ("optim", "b2", 1.0, r"a finite number in \[0, 1\), got 1.0"),
    ("train", "ema_decay", 1.0, r"a finite number in \[0, 1\), got 1.0"),
    ("train", "ema_decay", float("nan"), r"a finite number in \[0, 1\), got nan"),
    ("train", "num_steps", 0, "a finite number >= 1, got 0"),
    ("train", "sample_guidance", float("nan"), "a finite number >= 0, got nan"),
    ("diffusion", "min_snr_gamma", float("inf"), "a finite number > 0, got inf"),
  ],
)
def test_impossible_numeric_setting_is_named_when_the_config_is_completed(
  section, key, value, expected
):
  config = digits.get_config("smoke")
  config[section][key] = value
  with pytest.raises(ValueError, match=f"^{section}.{key} must be {expected}.$"):
    diffusion_config.complete_config(config)


@pytest.mark.parametrize(
  "sampler,expected",
  [
    ({"sampler": "ddim", "eta": 1.5}, r"sampler.eta must be a finite number in \[0, 1\], got 1.5"),
    ({"guidance": float("nan")}, "sampler.guidance_scale must be a finite number >= 0, got nan"),
    ({"steps": -2}, "sampler.steps must be a finite number >= 1, got -2"),
  ],
)
def test_impossible_sampler_setting_is_named_when_an_eval_config_is_completed(sampler, expected):
  config = eval_digits.get_config()
  config.samplers = (sampler,)
  with pytest.raises(ValueError, match=expected):
    eval_config.complete_config(config)


def test_impossible_segmentation_setting_is_named_when_the_config_is_completed():
  config = segmentation_cells.get_config()
  config.augment.brightness = float("nan")
  with pytest.raises(ValueError, match="augment.brightness must be a finite number >= 0, got nan"):
    segmentation_config.complete_config(config)


def test_the_names_a_config_accepts_are_the_names_of_the_registries_that_build_them():
  """config/ lists each setting's names without JAX; they must be the registries' keys."""
  from diffusion_jax import diffusion, losses, sampling, schedules  # pylint: disable=g-import-not-at-top
  from diffusion_jax import ode, ode_likelihood  # pylint: disable=g-import-not-at-top

  assert set(diffusion_config.BETA_SCHEDULES) == set(schedules.BETA_SCHEDULES)
  assert diffusion_config.MEAN_TYPES == tuple(m.value for m in diffusion.MeanType)
  assert diffusion_config.VAR_TYPES == tuple(v.value for v in diffusion.VarType)
  assert diffusion_config.LOSSES == tuple(loss.value for loss in losses.LossType)
  assert set(diffusion_config.TIMESTEP_SAMPLERS) == set(losses.TIMESTEP_SAMPLERS)
  assert set(sampler_config.SAMPLERS) == set(sampling.SAMPLERS)
  assert sampler_config.EDM_DEFAULT_STEPS == 18  # EDM's CIFAR-10 setting (Karras et al. 2022)
  assert list(model_settings.ZOO_SETTINGS) == list(models.MODEL_ZOO)
  assert eval_config.ODE_SOLVERS == ode.METHODS
  assert eval_config.ODE_DIVERGENCES == ode_likelihood.DIVERGENCES
  assert eval_config.ODE_PROBES == ode_likelihood.PROBES
  assert eval_config.ODE_DEQUANTISATIONS == ode_likelihood.DEQUANTISATIONS
