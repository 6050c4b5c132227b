"""A sampler's settings (sampling/generate.py runs them): which sampler, its steps and options.

Importing no JAX, so configs (the grids of a training config, configs/eval's
sweeps) name samplers without it; `SAMPLERS` must be the keys of
`sampling.SAMPLERS` (tests/test_configs.py checks).
"""

from __future__ import annotations

import dataclasses

from diffusion_jax import configlib

SAMPLERS = ("consistency", "ddim", "ddpm", "dpm_solver", "edm_heun")
EDM_DEFAULT_STEPS = 18  # EDM's CIFAR-10 setting: 35 network calls
SPACINGS = ("auto", "log_snr", "time")  # how "dpm_solver" spaces its steps
# "auto" spaces fewer DPM-Solver++ steps than this uniformly in time, more uniformly in log-SNR.
# Measured on the digits (docs/sampling.md): at 5 steps the log-SNR grid's fd_digits is ~4x
# DDIM's, the time grid's below it; from 20 steps the log-SNR grid is as good or better.
TIME_SPACING_BELOW = 15


def edm_network_calls(num_steps: int) -> int:
  """The network evaluations of EDM's Heun sampler per image: 2N - 1 (no correction at sigma_N = 0)."""
  return 2 * num_steps - 1


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Which sampler to run and how."""

  sampler: str = "ddim"  # "ddpm", "ddim", "dpm_solver", "edm_heun" or "consistency"
  # Model calls over [0, T-1]; None = all T (see make_batch_sampler). For "edm_heun": EDM's N
  # noise levels (2N - 1 calls); None = 18. For "consistency": its steps; None = 1.
  steps: int | None = None
  eta: float = 0.0  # DDIM's noise scale in [0, 1], 0 = deterministic; "ddim" only
  guidance_scale: float = 0.0  # classifier-free guidance w; 0 = none
  order: int = 2  # DPM-Solver++'s multistep order, 1-3; "dpm_solver" only
  # DPM-Solver++'s steps uniform in "log_snr" (Lu et al.'s choice) or in "time" (DDIM's); "auto":
  # time below TIME_SPACING_BELOW steps, log-SNR from there. "dpm_solver" only.
  spacing: str = "auto"
  # EDM Algorithm 2's stochasticity (Karras et al. 2022, Table 5); "edm_heun" only. 0 = the
  # deterministic Heun sampler.
  s_churn: float = 0.0
  s_tmin: float = 0.0
  s_tmax: float = float("inf")
  s_noise: float = 1.0

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise ValueError(f"Unknown sampler {self.sampler!r}; known: {sorted(SAMPLERS)}.")
    configlib.check_ranges(
      self,
      "sampler",
      {
        "steps": configlib.AT_LEAST_ONE,
        "eta": configlib.UNIT_INTERVAL,
        "guidance_scale": configlib.NON_NEGATIVE,
        "s_churn": configlib.NON_NEGATIVE,
        "s_tmin": configlib.NON_NEGATIVE,
        "s_noise": configlib.POSITIVE,
      },
    )
    if self.eta and self.sampler != "ddim":
      raise ValueError(f"eta={self.eta} applies to sampler 'ddim' only, not {self.sampler!r}.")
    if self.order != 2 and self.sampler != "dpm_solver":
      raise ValueError(
        f"order={self.order} applies to sampler 'dpm_solver' only, not {self.sampler!r}."
      )
    if self.order not in (1, 2, 3):
      raise ValueError(f"order must be 1, 2 or 3 (DPM-Solver++), got {self.order}.")
    if self.spacing not in SPACINGS:
      raise ValueError(f"Unknown spacing {self.spacing!r}; known: {list(SPACINGS)}.")
    if self.spacing != "auto" and self.sampler != "dpm_solver":
      raise ValueError(
        f"spacing={self.spacing!r} applies to sampler 'dpm_solver' only, not {self.sampler!r}."
      )
    if self.sampler != "edm_heun" and self._churn_settings():
      raise ValueError(
        f"{', '.join(self._churn_settings())} apply to sampler 'edm_heun' only,"
        f" not {self.sampler!r}."
      )
    if not self.s_tmax >= self.s_tmin:  # s_tmax may be inf: not a finite Range
      raise ValueError(f"sampler.s_tmax must be >= s_tmin={self.s_tmin}, got {self.s_tmax}.")

  def _churn_settings(self) -> list[str]:
    """The EDM churn fields set away from their defaults, as 'name=value'."""
    defaults = SamplerConfig.__dataclass_fields__
    return [
      f"{name}={getattr(self, name):g}"
      for name in ("s_churn", "s_tmin", "s_tmax", "s_noise")
      if getattr(self, name) != defaults[name].default
    ]

  @property
  def options(self) -> str:
    """The sampler-specific settings away from their defaults, e.g. 's_churn=40' or 'order=3'."""
    return " ".join(
      self._churn_settings()
      + ([f"order={self.order}"] if self.order != 2 else [])
      + ([f"spacing={self.spacing}"] if self.spacing != "auto" else [])
    )

  def spaced_in_log_snr(self, num_timesteps: int) -> bool:
    """Whether the steps are uniform in log-SNR ("dpm_solver"'s `spacing`), else in time."""
    if self.sampler != "dpm_solver" or self.spacing == "time":
      return False
    return self.spacing == "log_snr" or self.num_steps(num_timesteps) >= TIME_SPACING_BELOW

  def num_steps(self, num_timesteps: int) -> int:
    """The steps the sampler takes: `steps`, or its default (T; EDM's 18 for "edm_heun"; 1 for
    "consistency")."""
    defaults = {"edm_heun": EDM_DEFAULT_STEPS, "consistency": 1}
    return self.steps or defaults.get(self.sampler, num_timesteps)

  def nfe(self, num_timesteps: int) -> int:
    """Network evaluations per image (NFE): the steps, 2N - 1 for "edm_heun", x2 with guidance."""
    steps = self.num_steps(num_timesteps)
    calls = edm_network_calls(steps) if self.sampler == "edm_heun" else steps
    return calls * (2 if self.guidance_scale else 1)

  @property
  def label(self) -> str:
    """A file name for these settings, e.g. 'ddim-50steps-eta0-w0' (and any non-default option)."""
    extra = "".join(f"-{option.replace('=', '')}" for option in self.options.split())
    return (
      f"{self.sampler}-{self.steps or 'all'}steps-eta{self.eta:g}-w{self.guidance_scale:g}{extra}"
    )
