"""Training: the train state, the pure jitted step, and the loop around it.

    state = train.train_and_evaluate(config, workdir)   # resumes from workdir's latest checkpoint
"""

from diffusion_jax.train.experiment import Experiment, build
from diffusion_jax.train.optimizer import make_optimizer
from diffusion_jax.train.run_config import ConfigChangeError
from diffusion_jax.train.step import (StepFns, TrainMetrics, TrainState, compute_metrics,
                                      merge_metrics, train_step)

__all__ = [
    "ConfigChangeError", "Experiment", "StepFns",
    "TrainMetrics", "TrainState", "build", "compute_metrics", "merge_metrics", "make_optimizer", "train_and_evaluate", "train_step",
]


def __getattr__(name: str):
  """`train_and_evaluate`, imported on first use (PEP 562).

  The loop writes metrics with clu's writers, which import TensorFlow (seconds,
  and its start-up log); sampling, evaluation and conversion import this
  package for the checkpoint and experiment modules and never train.
  """
  if name == "train_and_evaluate":
    from diffusion_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
    return train_and_evaluate
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
