"""Runs a launcher that receives SIGTERM right after training step N: a preemption at a known step.

    python tests/sigterm_at_step.py N launch.train --config=... --workdir=...

The signal is real (os.kill of this process, handled by the loop's own SIGTERM
handler), but sent from inside the loop, so the test does not race the clock.
"""

import os
import runpy
import signal
import sys

from diffusion_jax.train import checkpoint


def _signal_after(step: int) -> None:
  reached = checkpoint.PreemptionNotice.reached

  def reached_with_signal(notice, current: int) -> bool:
    if current == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return reached(notice, current)

  checkpoint.PreemptionNotice.reached = reached_with_signal


if __name__ == "__main__":
  _signal_after(int(sys.argv[1]))
  sys.argv = sys.argv[2:]
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
