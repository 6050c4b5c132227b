"""Runs a launcher with a failure put at a known point of its run, so tests never race the clock.

    TEST_SIGTERM_AFTER_STEP=N python tests/hooked_launch.py launch.train --config=... --workdir=...

- TEST_SIGTERM_AFTER_STEP=N: the process sends itself SIGTERM right after
  training step N. The signal is real (os.kill, handled by the run's own
  handler, or by JAX's preemption service in a multi-process job), but it is
  sent from inside the loop, at the step the test chose.
- TEST_PAUSE_IN_SAVE=1: the process's first checkpoint commit stops after the
  checkpoint's temporary directory is written and before it is renamed into
  place; the process logs "Paused inside the save of PATH" and waits there to
  be killed.
"""

import asyncio
import os
import runpy
import signal
import sys

from absl import logging
from orbax.checkpoint._src.path import atomicity

from diffusion_jax import checkpoint


def _signal_after(step: int) -> None:
  reached = checkpoint.PreemptionNotice.reached

  def reached_with_signal(notice, current: int) -> bool:
    if current == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return reached(notice, current)

  checkpoint.PreemptionNotice.reached = reached_with_signal


def _pause_in_first_save() -> None:
  """Orbax's rename of a finished temporary checkpoint directory never happens: it waits."""

  async def paused_finalize(temporary_path, *args, **kwargs):
    del args, kwargs
    logging.info("Paused inside the save of %s", temporary_path.get())
    logging.flush()
    await asyncio.sleep(3600)

  atomicity.AtomicRenameTemporaryPath.finalize = paused_finalize


if __name__ == "__main__":
  if "TEST_SIGTERM_AFTER_STEP" in os.environ:
    _signal_after(int(os.environ["TEST_SIGTERM_AFTER_STEP"]))
  if os.environ.get("TEST_PAUSE_IN_SAVE") == "1":
    _pause_in_first_save()
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # launch/, configs/
  sys.argv = sys.argv[1:]
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
