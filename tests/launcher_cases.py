"""Runs one launcher's main() on several command lines in one process, as `python -m` runs it.

    python tests/launcher_cases.py launch.sample '[["--workdir=W", "--batch_size=3"], ...]'

Prints one JSON object per command line: {"status": the exit status,
"stderr": what the program wrote to sys.stderr, "traceback": whether an
exception escaped}. Log records go to absl's handler, not to sys.stderr,
so they are not in "stderr". Importing a launcher (JAX, Flax, Orbax) takes
seconds: one process per launcher keeps tests/test_launcher_errors.py fast.
"""

import contextlib
import importlib
import io
import json
import os
import sys
import traceback

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # noqa: E402  (after the repository is on sys.path)


def run_case(module, argv: list[str]) -> dict:
  """Runs `python -m MODULE *argv` in this process; the exit status and stderr it would give."""
  flags.FLAGS.unparse_flags()
  sys.argv = [module.__file__, *argv]
  stderr, status, escaped = io.StringIO(), 0, False
  with contextlib.redirect_stderr(stderr):
    try:
      common.run(module.main)
    except SystemExit as exit_:
      if isinstance(exit_.code, str):  # what the interpreter does with sys.exit("message")
        print(exit_.code, file=sys.stderr)
      status = exit_.code if isinstance(exit_.code, int) else 1
    except Exception:  # pylint: disable=broad-except  (the interpreter would print it)
      traceback.print_exc()
      status, escaped = 1, True
  return {"status": status, "stderr": stderr.getvalue(), "traceback": escaped}


def main() -> None:
  module = importlib.import_module(sys.argv[1])
  for argv in json.loads(sys.argv[2]):
    print(json.dumps(run_case(module, argv)), flush=True)


if __name__ == "__main__":
  main()
