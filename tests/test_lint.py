"""The code has no undefined names, unused imports or syntax errors (ruff, pyproject's rules)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  result = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise",
       "diffusion_jax", "launch", "configs", "benchmarks", "tests"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
