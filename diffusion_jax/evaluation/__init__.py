"""Evaluation: FID, Inception Score, sFID, precision/recall and NLL in bits/dim.
Typical use:

    variables = evaluation.load_inception("pt_inception-2015-12-05-6726825d.pth")
    feats = evaluation.inception_features(variables, images_uint8_NHWC)   # pool, logits, spatial
    fid = evaluation.frechet_distance(mu1, sigma1, mu2, sigma2)
    report = evaluation.evaluate(evaluation.from_config_dict(cfg), workdir)  # a whole protocol
"""

from diffusion_jax.config.evaluation import EvalConfig, NllConfig, NllOdeConfig, from_config_dict
from diffusion_jax.evaluation.inception import (
  apply_inception,
  inception_features,
  load_inception,
  params_from_state_dict,
)
from diffusion_jax.evaluation.metrics import (
  GaussianAccumulator,
  frechet_distance,
  inception_score,
  precision_recall,
)
from diffusion_jax.evaluation.reference import ReferenceStats, load_reference, save_reference
from diffusion_jax.evaluation.run import evaluate

__all__ = [
  "EvalConfig",
  "GaussianAccumulator",
  "NllConfig",
  "NllOdeConfig",
  "ReferenceStats",
  "apply_inception",
  "evaluate",
  "frechet_distance",
  "from_config_dict",
  "inception_features",
  "inception_score",
  "load_inception",
  "load_reference",
  "params_from_state_dict",
  "precision_recall",
  "save_reference",
]
