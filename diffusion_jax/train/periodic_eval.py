"""A small sample-quality evaluation during training, logged to TensorBoard (`train.eval_every`).

Every eval_every steps the EMA parameters draw `eval_num_samples` images with
the grid sampler's settings, and one Fréchet distance is computed against the
training split's statistics (cached in WORKDIR/eval/ on first use): `fid`
on the Inception network (weights from $DIFFUSION_JAX_INCEPTION_WEIGHTS) or
`fd_digits` on the digits classifier. A few thousand samples give a biased,
but comparable-across-steps, curve; report final numbers with launch.evaluate.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax import images, parallel, sampling
from diffusion_jax.config.evaluation import EvalConfig
from diffusion_jax.evaluation import features, run, scores

if TYPE_CHECKING:
  from diffusion_jax.train.diffusion_task import Experiment


def make_evaluator(exp: Experiment, mesh, workdir: str) -> Callable[[object, int], dict]:
  """`evaluate(ema_params, step) -> {"eval/<metric>": value}`; loads the network and reference now.

  Raises at start, not at the first evaluation, when the network or the data is missing.
  """
  train = exp.train
  sampler = sampling.SamplerConfig(sampler=train.sampler, steps=train.sample_steps)
  config = EvalConfig(
    name="train",
    metrics=(train.eval_metric,),
    samplers=(sampler,),
    num_samples=train.eval_num_samples,
    seed=exp.config.seed,
    data=dataclasses.asdict(exp.data) | {"shuffle": False, "random_flip": False},
    reference_split=exp.data.split,
  )
  network = scores.network(train.eval_metric)
  net = features.LOADERS[network](config)
  references = {network: run.reference_statistics(net, config, exp.data, workdir)}
  batch_size = -(-min(train.eval_num_samples, 256) // mesh.size) * mesh.size
  sample_batch = jax.jit(
    sampling.make_batch_sampler(
      sampler,
      exp.apply_fn,
      exp.spec,
      exp.schedule,
      exp.image_shape,
      batch_size,
      num_classes=exp.num_classes,
    ),
    out_shardings=parallel.batch_sharding(mesh),
    compiler_options=parallel.compiler_options(mesh),
  )

  def evaluate(ema_params, step: int) -> dict:
    key = jax.random.fold_in(jax.random.key(exp.config.seed + 2), step)
    batches = [
      multihost_utils.process_allgather(
        sample_batch(ema_params, jax.random.fold_in(key, b)), tiled=True
      )
      for b in range(-(-train.eval_num_samples // batch_size))
    ]
    samples = images.to_uint8(np.concatenate(batches)[: train.eval_num_samples])
    found = run.score_samples(samples, {network: net}, references, config)
    return {f"eval/{train.eval_metric}": found[train.eval_metric]}

  return evaluate
