"""Training: the train state, the pure jitted step, and the loop around it.

    state = train.train_and_evaluate(config, workdir)   # resumes from workdir's latest checkpoint
"""

from diffusion_jax.train.experiment import DiffusionConfig, Experiment, TrainConfig, build
from diffusion_jax.train.loop import train_and_evaluate
from diffusion_jax.train.optimizer import OptimConfig, make_optimizer
from diffusion_jax.train.run_config import ConfigChangeError
from diffusion_jax.train.step import (StepFns, TrainMetrics, TrainState, compute_metrics,
                                      merge_metrics, train_step)

__all__ = [
    "ConfigChangeError", "DiffusionConfig", "Experiment", "OptimConfig", "StepFns", "TrainConfig",
    "TrainMetrics", "TrainState", "build", "compute_metrics", "merge_metrics", "make_optimizer", "train_and_evaluate", "train_step",
]
