"""Writes tests/data/quality/digits_ema.npz: the EMA parameters of a short digits run.

tests/test_quality.py samples from them and checks fd_digits against a bound.
Not run by the tests (it trains for ~10 minutes on a 2-core CPU):

    python tests/data/quality/make_checkpoint.py

The run is tests/test_quality.py's `quality_config`: configs/digits.py (1000
steps, batch 64) with its U-Net at 32 base channels instead of 64, so that the
file stays small.
"""

import os
import sys
import tempfile

import jax
import numpy as np
from flax import traverse_util

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from diffusion_jax import checkpoint, parallel  # noqa: E402
from diffusion_jax.train import loop, tasks  # noqa: E402
from test_quality import quality_config  # noqa: E402

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_ema.npz")


def main():
  config = quality_config()
  with tempfile.TemporaryDirectory() as workdir:
    loop.train_and_evaluate(config, workdir)
    exp = tasks.build(config)
    state, shardings = loop.create_state(exp, parallel.make_mesh(), config.seed)
    checkpointer = checkpoint.Checkpointer(workdir, every_steps=1, keep=2)
    restored = jax.device_get(checkpointer.restore(checkpoint.restore_target(state, shardings)))
    checkpointer.close()
  flat = traverse_util.flatten_dict(restored.ema_params, sep="/")
  np.savez_compressed(OUTPUT, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
  print(f"Wrote {OUTPUT}: {sum(v.size for v in flat.values())} parameters, step {int(restored.step)},"
        f" {os.path.getsize(OUTPUT)} bytes.")


if __name__ == "__main__":
  main()
