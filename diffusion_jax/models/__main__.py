"""Prints the model zoo, or the parameters of one entry.

  python -m diffusion_jax.models          # markdown table of every entry
  python -m diffusion_jax.models NAME     # clu parameter overview of NAME

Shapes come from jax.eval_shape: nothing is allocated, even for 300M params.
"""

import sys

from clu import parameter_overview

from diffusion_jax.models import zoo


def main(argv: list[str]) -> None:
  if len(argv) > 2:
    raise SystemExit(__doc__)
  if len(argv) == 1:
    print(zoo.zoo_table())
    return
  try:
    entry = zoo.lookup(argv[1])
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  _, variables = zoo.entry_shapes(argv[1])
  print(f"{argv[1]}: {entry.paper}, input {entry.input_shape}")
  print(parameter_overview.get_parameter_overview(variables["params"], include_stats=False))


if __name__ == "__main__":
  main(sys.argv)
