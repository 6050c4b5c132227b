"""The few-step tasks' sections (`task = "progressive"` or "consistency"), and `complete_config`.

A distillation run trains a student diffusion model from a frozen teacher, a
finished run in another workdir (consistency training, iCT, needs none). Its
config holds the diffusion sections of the student (`data`, `model`,
`diffusion`: the teacher's, but for the student's parameterisation), the
loop's `train`, `optim`, and `distill`:

  distill   ProgressiveConfig: the teacher's workdir and the rounds that halve the steps
            ConsistencyConfig: CD's teacher and target network, or iCT's curriculum; the metric

The student's workdir is then a diffusion run of its own: launch.sample reads
it (runs.load_ema_for_sampling) at the steps its checkpoint was distilled to.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from diffusion_jax import configlib
from diffusion_jax.config import diffusion
from diffusion_jax.config.data import DataConfig
from diffusion_jax.config.diffusion import DiffusionConfig
from diffusion_jax.config.optim import OptimConfig
from diffusion_jax.config.train import TrainConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProgressiveConfig:
  """Progressive distillation (Salimans & Ho 2022, Algorithm 2): rounds that halve the steps.

  Round r (from 0) trains a student of K_r = start_steps / 2^(r+1) DDIM steps
  on two steps of its teacher (the frozen run at r = 0, round r - 1's student
  after), for `steps_per_round` optimizer steps; the last round ends at
  `end_steps`. The K-step grid is the teacher's timesteps
  t_j = round(j T / K) - 1, j = 1..K ("trailing" spacing), so each round's grid
  is every other point of the one before.
  """

  teacher_workdir: str = ""  # a finished diffusion run (ours, or launch.convert's)
  start_steps: int = 256  # the teacher's DDIM steps in round 0 (a power of 2 times end_steps)
  end_steps: int = 1  # the last student's steps
  steps_per_round: int = 50_000  # optimizer steps of each halving

  def __post_init__(self):
    configlib.check_ranges(
      self,
      "distill",
      dict.fromkeys(("start_steps", "end_steps", "steps_per_round"), configlib.AT_LEAST_ONE),
    )
    ratio = self.start_steps // self.end_steps
    if self.start_steps % self.end_steps or ratio < 2 or ratio & (ratio - 1):
      raise ValueError(
        f"distill.start_steps={self.start_steps} must be end_steps="
        f"{self.end_steps} times a power of 2 (at least 2): each round halves."
      )

  @property
  def num_rounds(self) -> int:
    return (self.start_steps // self.end_steps).bit_length() - 1

  @property
  def num_steps(self) -> int:
    """The optimizer steps of all rounds: train.num_steps may be at most this."""
    return self.num_rounds * self.steps_per_round

  def round_of(self, step: int) -> int:
    """The round that optimizer step `step` (1-based, as the loop counts) belongs to."""
    return min(max(step - 1, 0) // self.steps_per_round, self.num_rounds - 1)

  def student_steps(self, step: int) -> int:
    """K: the DDIM steps of the student after optimizer step `step` (a checkpoint's step)."""
    return self.start_steps >> (self.round_of(step) + 1)


CONSISTENCY_METHODS = ("cd", "ict")
CONSISTENCY_METRICS = ("pseudo_huber", "l2", "lpips")  # distill/consistency_task.metric_fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConsistencyConfig:
  """Consistency distillation (CD, Song et al. 2023) or improved consistency training (iCT).

  Both train f(x, sigma) (consistency.py; the student's diffusion.parameterization
  must be "consistency") on adjacent levels sigma_n < sigma_{n+1} of the Karras
  discretisation of [0.002, 80] (rho 7). CD: N = `num_scales` levels, n uniform,
  x_n one Heun step of the teacher's ODE from x_{n+1}, the target network an EMA
  of the student at rate `target_ema`, unit weights. iCT: no teacher, x_n and
  x_{n+1} share the noise, N(k) doubles from scales_start + 1 to scales_end + 1
  (iCT eq. 5), n drawn lognormally (diffusion.p_mean, p_std: iCT uses -1.1, 2.0),
  the target the student itself without gradient, weights 1 / (sigma_{n+1} - sigma_n).
  The metric d is pseudo-Huber, l2, or LPIPS (CM's best CD numbers:
  evaluation/lpips.py, on images resized to `lpips_resolution` as CM's code
  does), whose VGG16 and linear layers are read from the user's torch files.
  """

  method: str = "ict"  # "cd" or "ict"
  teacher_workdir: str = ""  # "cd": a finished diffusion run (EDM's or a DDPM's)
  num_scales: int = 18  # "cd": N (CM's CIFAR-10 setting)
  target_ema: float = 0.95  # "cd": mu of the target network (CM's CIFAR-10 CD setting)
  scales_start: int = 10  # "ict": s_0
  scales_end: int = 1280  # "ict": s_1
  metric: str = "pseudo_huber"  # "pseudo_huber" (iCT), "l2" or "lpips" (CM's CD)
  huber_scale: float = 0.00054  # pseudo-Huber c = huber_scale sqrt(H W C) (iCT sec. 3.3)
  # "lpips": the `lpips` package's weights/v0.1/vgg.pth (its linear layers), or one
  # LPIPS(net="vgg").state_dict() file holding the VGG16 too
  lpips_weights: str = ""
  vgg_weights: str = ""  # "lpips": torchvision's vgg16 state dict, beside lpips' vgg.pth; "" = none
  lpips_resolution: int = 224  # "lpips": images resized (bilinear) to this square size (CM's 224)

  def __post_init__(self):
    configlib.check_ranges(
      self,
      "distill",
      {
        "num_scales": configlib.Range(2),
        "target_ema": configlib.DECAY,
        "scales_start": configlib.AT_LEAST_ONE,
        "scales_end": configlib.AT_LEAST_ONE,
        "huber_scale": configlib.POSITIVE,
        "lpips_resolution": configlib.Range(16),
      },
    )
    diffusion.check_name(self.method, CONSISTENCY_METHODS, "distill.method")
    diffusion.check_name(self.metric, CONSISTENCY_METRICS, "distill.metric")
    if self.metric == "lpips" and not self.lpips_weights:
      raise ValueError(
        "distill.metric='lpips' needs distill.lpips_weights: the `lpips` package's"
        " weights/v0.1/vgg.pth (with distill.vgg_weights, torchvision's vgg16"
        " state dict) or one LPIPS(net='vgg') state dict file."
      )
    if self.method == "ict" and self.scales_end < self.scales_start:
      raise ValueError(
        f"distill.scales_end={self.scales_end} must be >= scales_start={self.scales_start}."
      )

  @property
  def max_scales(self) -> int:
    """The most levels N any step uses: CD's N, or iCT's s_1 + 1."""
    return self.num_scales if self.method == "cd" else self.scales_end + 1


SECTIONS = ("seed", "task", "data", "model", "diffusion", "optim", "train", "distill")
_STUDENT_SECTIONS = {
  "data": DataConfig,
  "diffusion": DiffusionConfig,
  "optim": OptimConfig,
  "train": TrainConfig,
}
# config.task -> the dataclass of each section but model (the zoo's) and the scalars.
SECTION_CLASSES = {
  "progressive": {**_STUDENT_SECTIONS, "distill": ProgressiveConfig},
  "consistency": {**_STUDENT_SECTIONS, "distill": ConsistencyConfig},
}
TASKS = tuple(SECTION_CLASSES)


def student_config(teacher: ml_collections.ConfigDict, task: str) -> ml_collections.ConfigDict:
  """A distillation config's start: seed 0, `task`, and the `teacher` config's data, model and
  diffusion sections, which the student's config then changes where it differs."""
  return ml_collections.ConfigDict(
    dict(seed=0, task=task, data=teacher.data, model=teacher.model, diffusion=teacher.diffusion)
  )


def complete_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with every field its sections know, as `config.diffusion.complete_config` does.

  The data, model and diffusion sections are completed as a diffusion run's
  (they describe the student, a diffusion model); `train` is the loop's alone
  (no sample grids); `distill` is the task's (`SECTION_CLASSES`). A key no
  section knows is a ValueError naming it.
  """
  configlib.check_known(config, SECTIONS, "config")
  student = ml_collections.ConfigDict(
    {key: config[key] for key in config if key in ("seed", "data", "model", "diffusion")}
  )
  complete = diffusion.complete_config(student)
  del complete["optim"], complete["train"]
  complete.task = config.get("task", TASKS[0])
  diffusion.check_name(complete.task, TASKS, "task")
  for name in ("optim", "train", "distill"):
    cls = SECTION_CLASSES[complete.task][name]
    complete[name] = configlib.section(cls, config.get(name), name=name)
    configlib.from_mapping(cls, complete[name], name)  # checks its values; `build` again after
  return complete
