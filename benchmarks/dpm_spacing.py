"""fd_digits of DPM-Solver++ on its two step grids, beside DDIM, at few steps.

    python -m benchmarks.dpm_spacing                    # 5, 10, 20, 50 steps
    python -m benchmarks.dpm_spacing --steps=5,10

The model is the committed digits run that tests/test_quality.py samples
(tests/data/quality/digits_ema.npz: configs/digits.py, 1000 steps, a
32-channel U-Net), so the table needs no training. Every setting draws 300
samples with the same key through `sampling.make_batch_sampler`, as
launch.sample and launch.evaluate do; fd_digits is the Fréchet distance of
the digits classifier's features against the 1,497 training digits (the 300
held-out real digits: 7.7). It backs `SamplerConfig.spacing`'s "auto" rule
(docs/sampling.md): DPM-Solver++ below 15 steps uniform in time, from 15 in
log-SNR.
"""

import os

import jax
import numpy as np
from absl import app, flags
from flax import traverse_util

from configs import digits
from diffusion_jax import images, sampling
from diffusion_jax.data import sources
from diffusion_jax.evaluation import digits_classifier, metrics
from diffusion_jax.train import tasks

PARAMS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  "tests",
  "data",
  "quality",
  "digits_ema.npz",
)
NUM_SAMPLES = 300
SETTINGS = {  # column: SamplerConfig fields besides the steps
  "DDIM": dict(sampler="ddim"),
  **{
    f"DPM++({order}M) {spacing}": dict(sampler="dpm_solver", order=order, spacing=spacing)
    for order in (2, 3)
    for spacing in ("log_snr", "time")
  },
}

_STEPS = flags.DEFINE_list("steps", ["5", "10", "20", "50"], "Network calls per image.")
_PARAMS = flags.DEFINE_string("params", PARAMS, "EMA parameters of a 32-channel digits run.")


def _gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  features = features.astype(np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def main(argv):
  del argv
  config = digits.get_config()
  config.model.ch = 32
  exp = tasks.build(config)
  with np.load(_PARAMS.value) as saved:
    params = traverse_util.unflatten_dict({key: saved[key] for key in saved.files}, sep="/")
  classifier = digits_classifier.load_or_train()
  features = lambda uint8: digits_classifier.digits_features(classifier, uint8)["pool"]
  real = _gaussian(features(sources.digits_source("train").images))

  def fd_digits(sampler_config: sampling.SamplerConfig) -> float:
    draw = jax.jit(
      sampling.make_batch_sampler(
        sampler_config, exp.apply_fn, exp.spec, exp.schedule, exp.image_shape, NUM_SAMPLES
      )
    )
    fake = features(images.to_uint8(draw(params, jax.random.key(0))))
    return metrics.frechet_distance(*_gaussian(fake), *real)

  print("| NFE | " + " | ".join(SETTINGS) + " |")
  print("|---:|" + "---:|" * len(SETTINGS))
  for steps in map(int, _STEPS.value):
    row = [fd_digits(sampling.SamplerConfig(steps=steps, **fields)) for fields in SETTINGS.values()]
    print(f"| {steps} | " + " | ".join(f"{fd:.1f}" for fd in row) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
