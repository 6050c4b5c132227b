"""The code has no undefined names, unused imports or syntax errors, and one layout: ruff's.

Both checks read pyproject's [tool.ruff] settings; `ruff format .` fixes what
the second one finds.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["diffusion_jax", "launch", "configs", "benchmarks", "tests"]


@pytest.mark.parametrize(
  "command",
  [["check", "--no-cache", "--output-format=concise"], ["format", "--no-cache", "--check"]],
  ids=["lint", "format"],
)
def test_ruff_finds_nothing(command):
  result = subprocess.run(
    [sys.executable, "-m", "ruff", *command, *SOURCES],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
