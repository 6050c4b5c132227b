"""The evaluation config (configs/eval/*.py): which metrics, on which samples, against which reference."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from diffusion_jax import configlib, files
from diffusion_jax.config.data import DataConfig
from diffusion_jax.config.sampler import SamplerConfig
from diffusion_jax.configlib import from_mapping

# Each sample metric (evaluation/scores.py computes it) -> the feature network it runs on: the
# Inception network's (Heusel et al. 2017; Salimans et al. 2016; Nash et al. 2021;
# Kynkäänniemi et al. 2019), or the same formulas on the digits classifier's, never called
# FID or IS.
METRIC_NETWORKS = {
  "fid": "inception",
  "is": "inception",
  "sfid": "inception",
  "precision_recall": "inception",
  "fd_digits": "digits_classifier",
  "is_digits": "digits_classifier",
}
INCEPTION_METRICS = tuple(m for m, network in METRIC_NETWORKS.items() if network == "inception")
# Likelihood metrics, on a data split rather than on samples (evaluation/run.py runs them): the
# variational bound (evaluation/nll.py) and the probability-flow ODE's exact NLL
# (evaluation/nll_ode.py).
LIKELIHOOD_METRICS = ("nll", "nll_ode")
METRICS = (*METRIC_NETWORKS, *LIKELIHOOD_METRICS)
# nll_ode's settings, named without JAX: they must be ode.METHODS and ode_likelihood's
# DIVERGENCES, PROBES and DEQUANTISATIONS (tests/test_configs.py checks).
ODE_SOLVERS = ("dopri5", "fixed")
ODE_DIVERGENCES = ("hutchinson", "exact")
ODE_PROBES = ("rademacher", "gaussian")
ODE_DEQUANTISATIONS = ("uniform", "centered", "none")
RESIZE_MODES = ("tf", "pytorch-fid")
WEIGHTS_ENV = "DIFFUSION_JAX_INCEPTION_WEIGHTS"


@dataclasses.dataclass(frozen=True, kw_only=True)
class NllConfig:
  """NLL in bits/dim on a split with the full bound (Ho et al. eq. 5; Improved DDPM sec. 3.2)."""

  split: str = "test"  # the data split; the run's data section says which dataset
  num_examples: int = 0  # the first N examples of the split; 0 = all of them
  batch_size: int = 256  # global, over all devices
  clip_x0: bool = True  # clip predicted x_0 in the bound, as Improved DDPM's image_nll.py does

  def __post_init__(self):
    configlib.check_ranges(
      self, "nll", {"num_examples": configlib.NON_NEGATIVE, "batch_size": configlib.AT_LEAST_ONE}
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class NllOdeConfig:
  """NLL in bits/dim through the probability-flow ODE (Song et al. 2021, score_sde's likelihood)."""

  split: str = "test"  # the data split; the run's data section says which dataset
  num_examples: int = 0  # the first N examples of the split; 0 = all of them
  batch_size: int = 256  # global, over all devices: one ODE solve (one step size) per batch
  solver: str = "dopri5"  # "dopri5" (adaptive, rtol/atol) or "fixed" (`steps` equal steps)
  rtol: float = 1e-5  # score_sde's tolerances
  atol: float = 1e-5
  steps: int = 100  # "fixed": steps over [t_min, 1], 6 network calls each
  max_steps: int = 10_000  # "dopri5": attempted steps per batch before it fails
  divergence: str = "hutchinson"  # or "exact": the full Jacobian trace, D calls per step (small D)
  probe: str = "rademacher"  # Hutchinson probes: "rademacher" (score_sde's) or "gaussian"
  probes: int = 1  # probes per example, fixed over the solve, averaged
  dequantisation: str = "uniform"  # "uniform" (score_sde's), "centered" or "none" (no bound)
  t_min: float = 1e-5  # the ODE starts at t = eps (score_sde's eps)
  repeats: int = 1  # passes over the split, each with fresh dequantisation and probes

  def __post_init__(self):
    configlib.check_ranges(
      self,
      "nll_ode",
      {
        "num_examples": configlib.NON_NEGATIVE,
        "rtol": configlib.POSITIVE,
        "atol": configlib.POSITIVE,
        "t_min": configlib.Range(0, 1, low_open=True, high_open=True),
        **dict.fromkeys(
          ("batch_size", "steps", "max_steps", "probes", "repeats"), configlib.AT_LEAST_ONE
        ),
      },
    )
    for key, known in (
      ("solver", ODE_SOLVERS),
      ("divergence", ODE_DIVERGENCES),
      ("probe", ODE_PROBES),
      ("dequantisation", ODE_DEQUANTISATIONS),
    ):
      if getattr(self, key) not in known:
        raise ValueError(f"Unknown nll_ode.{key} {getattr(self, key)!r}; known: {list(known)}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """One evaluation protocol; `configs/eval/*.py` build these.

  `samplers` lists (sampler, steps[, eta, guidance]) settings; several make a
  sweep with a FID-vs-NFE table and figure.
  """

  name: str  # the report goes to WORKDIR/eval/<name>-step<N>/
  metrics: tuple[str, ...]
  samplers: tuple[SamplerConfig, ...] = (SamplerConfig(),)
  num_samples: int = 50_000  # images drawn per sampler setting
  batch_size: int = 256  # images per sampling batch, over all devices
  seed: int = 0  # sampling batch b uses fold_in(key(seed), b); the NLLs' key
  # Draw every sampler setting once per seed, and report each draw and the min and mean over
  # them (EDM's protocol: the minimum of three); () = `seed` alone.
  seeds: tuple[int, ...] = ()
  checkpoint_step: int = -1  # -1 = the latest checkpoint
  reference_split: str = "train"  # the split whose statistics the samples are compared with
  reference_path: str = ""  # a precomputed reference .npz; "" = computed once and cached
  real_floor: bool = False  # also score the nll split's real images, as the floor
  data: dict = dataclasses.field(default_factory=dict)  # overrides of the run's data section
  nll: NllConfig = NllConfig()
  nll_ode: NllOdeConfig = NllOdeConfig()
  inception_weights: str = ""  # pt_inception-2015-12-05-6726825d.pth; "" = $WEIGHTS_ENV
  inception_sha256_prefix: str = "6726825d"  # the published file's; "" accepts any weights
  resize: str = "tf"  # "tf" reproduces the published numbers; or "pytorch-fid"
  is_splits: int = 10  # Inception Score splits (Salimans et al. 2016)
  pr_k: int = 3  # neighbours of precision/recall (Kynkäänniemi et al. 2019)
  feature_batch_size: int = 200  # images per feature-network batch

  def __post_init__(self):
    if unknown := sorted(set(self.metrics) - set(METRICS)):
      raise ValueError(f"Unknown eval metric(s) {unknown}; known: {list(METRICS)}.")
    if self.resize not in RESIZE_MODES:
      raise ValueError(f"Unknown resize {self.resize!r}; known: {list(RESIZE_MODES)}.")
    configlib.check_ranges(
      self,
      "eval",
      dict.fromkeys(
        ("num_samples", "batch_size", "is_splits", "pr_k", "feature_batch_size"),
        configlib.AT_LEAST_ONE,
      ),
    )
    if self.num_samples % self.is_splits and ("is" in self.metrics or "is_digits" in self.metrics):
      raise ValueError(
        f"num_samples={self.num_samples} must split into is_splits={self.is_splits} equal parts."
      )

  @property
  def sample_metrics(self) -> tuple[str, ...]:
    return tuple(m for m in self.metrics if m not in LIKELIHOOD_METRICS)

  @property
  def uses_inception(self) -> bool:
    return any(m in INCEPTION_METRICS for m in self.metrics)

  def weights_path(self) -> str:
    """The Inception weights file: the config's, else the environment's; an error names both."""
    path = self.inception_weights or os.environ.get(WEIGHTS_ENV, "")
    if not path:
      raise FileNotFoundError(
        f"Metrics {[m for m in self.metrics if m in INCEPTION_METRICS]} need the Inception"
        f" weights: set --config.inception_weights=PATH or ${WEIGHTS_ENV} to pytorch-fid's"
        " pt_inception-2015-12-05-6726825d.pth, published at https://github.com/mseitzer/"
        "pytorch-fid/releases (fid_weights-0.0.1) and by torch-fidelity; or evaluate the"
        " other metrics alone (e.g. --config.metrics=nll)."
      )
    if not files.is_file(path):
      raise FileNotFoundError(f"Inception weights file {path!r} does not exist.")
    return path


def complete_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with every field of EvalConfig, NllConfig and DataConfig at its default where unset.

  So the command line can override any of them on any eval config; configs/eval files end with
  it. `samplers` stays the file's list (or one default sampler).
  """
  values = dict(config)
  samplers = values.pop("samplers", ({},))
  data = values.pop("data", {})
  complete = configlib.section(EvalConfig, values, name="eval")
  complete.samplers = tuple(dict(sampler) for sampler in samplers)
  complete.data = configlib.section(DataConfig, data, name="data")
  from_config_dict(complete)  # checks every value, as the launcher does after the overrides
  return complete


def from_config_dict(config: Any) -> EvalConfig:
  """An EvalConfig from an ml_collections ConfigDict (or dict); bad keys and values named.

  `metrics` may be a tuple or a comma-separated string (`--config.metrics=fid,is`).
  """
  values = dict(config)
  samplers = tuple(
    from_mapping(SamplerConfig, _sampler_fields(s), "samplers[i]")
    for s in values.pop("samplers", ()) or ({},)
  )
  nll = from_mapping(NllConfig, values.pop("nll", {}), "nll")
  nll_ode = from_mapping(NllOdeConfig, values.pop("nll_ode", {}), "nll_ode")
  metrics = values.get("metrics", ())
  metrics = [metrics] if isinstance(metrics, str) else metrics
  values["metrics"] = tuple(name.strip() for entry in metrics for name in entry.split(","))
  values["data"] = dict(values.get("data", {}))
  return from_mapping(
    EvalConfig, {**values, "samplers": samplers, "nll": nll, "nll_ode": nll_ode}, "eval"
  )


def _sampler_fields(sampler: Any) -> dict:
  """A sampler entry as SamplerConfig fields: "guidance" for guidance_scale, steps 0 = all T."""
  fields = dict(sampler)
  if "guidance" in fields:
    fields["guidance_scale"] = fields.pop("guidance")
  if not fields.get("steps"):
    fields["steps"] = None
  return fields
