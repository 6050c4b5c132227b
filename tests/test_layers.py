"""One-way layers: the module graph of diffusion_jax/, launch/ and configs/ has no cycle, and
configs import no JAX, Flax or TensorFlow (docs/layout.md, issue 21).

The graph counts every import a module can run: at its top, inside functions
and methods, and `importlib.import_module` of a literal name; only imports
under `if TYPE_CHECKING:` (annotations, never run) are left out. Importing
`a.b.c` also runs the `__init__` of `a` and `a.b`, so those are edges too
(but not a module's edge to its own enclosing packages, which Python has
already started when it runs the module).
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOTS = ("diffusion_jax", "launch", "configs")
HEAVY = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax",
  "tensorflow",
  "tensorflow_datasets",
  "clu",
  "grain",
)


def _module_names() -> dict[str, pathlib.Path]:
  """{dotted name: file} of every module under ROOTS (a package by its __init__.py)."""
  modules = {}
  for root in ROOTS:
    for path in sorted((REPO / root).rglob("*.py")):
      parts = path.relative_to(REPO).with_suffix("").parts
      modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return modules


MODULES = _module_names()


def _is_type_checking(node: ast.AST) -> bool:
  test = getattr(node, "test", None)
  return isinstance(node, ast.If) and (
    (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
    or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
  )


def _walk(node: ast.AST):
  """ast.walk, leaving out the bodies of `if TYPE_CHECKING:`."""
  for child in ast.iter_child_nodes(node):
    if _is_type_checking(child):
      yield from (n for stmt in child.orelse for n in [stmt, *_walk(stmt)])
      continue
    yield child
    yield from _walk(child)


def imported_names(name: str) -> set[str]:
  """The dotted names module `name` imports, wherever in the file (see the module docstring)."""
  path = MODULES[name]
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in _walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(
          [
            *package.split(".")[: len(package.split(".")) - node.level + 1],
            *([base] if base else []),
          ]
        )
      found.update(f"{base}.{alias.name}" for alias in node.names)
      found.add(base)
    elif (
      isinstance(node, ast.Call)
      and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
      and node.args
      and isinstance(node.args[0], ast.Constant)
    ):
      found.add(node.args[0].value)
  return found


def _ours(dotted: str) -> str | None:
  """The module of ours that importing `dotted` runs last (itself, or the package holding it)."""
  parts = dotted.split(".")
  for end in range(len(parts), 0, -1):
    if ".".join(parts[:end]) in MODULES:
      return ".".join(parts[:end])
  return None


def module_graph() -> dict[str, set[str]]:
  """{module: the modules of ours importing it runs}, parents' __init__ included."""
  graph = {}
  for name in MODULES:
    own_packages = {".".join(name.split(".")[:end]) for end in range(1, name.count(".") + 1)}
    edges = set()
    for dotted in imported_names(name):
      target = _ours(dotted)
      if target is None:
        continue
      parts = target.split(".")
      edges.update(
        p
        for p in (".".join(parts[:end]) for end in range(1, len(parts) + 1))
        if p in MODULES and p not in own_packages
      )
    edges.discard(name)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None for a DAG."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_module_graph_is_a_dag():
  assert find_cycle(module_graph()) is None, " -> ".join(find_cycle(module_graph()))


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
  tree = ast.parse(
    "def f():\n  import x.y\nif TYPE_CHECKING:\n  import z\nimportlib.import_module('w')\n"
  )
  assert {
    getattr(n, "names", [None])[0].name if isinstance(n, ast.Import) else n.args[0].value
    for n in _walk(tree)
    if isinstance(n, ast.Import) or (isinstance(n, ast.Call) and n.args)
  } == {"x.y", "w"}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    if (node := todo.pop()) not in seen:
      seen.add(node)
      todo.extend(graph[node])
  return seen


@pytest.mark.parametrize("config", sorted(m for m in MODULES if m.startswith("configs")))
def test_configs_reach_no_jax_flax_or_tensorflow(config):
  """Every module a config can import, in any function, imports none of HEAVY."""
  heavy = {
    f"{module}: {dotted}"
    for module in _reachable(module_graph(), config)
    for dotted in imported_names(module)
    if dotted.partition(".")[0] in HEAVY
  }
  assert not heavy


def test_loading_a_config_imports_no_jax():
  code = (
    "import sys; import configs.digits as c; c.get_config('smoke'); print(sorted({m.partition("
    f"'.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
  )
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": str(REPO)},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]"
