"""The README's and docs/'s commands and Python blocks run: a documented promise is a test.

Every fenced `sh` block of README.md and docs/*.md is split into commands
(continuation lines joined, comments dropped, `&&` chains split), and each is
run, in the order of its document, in a temporary directory that holds the
documents' workdirs. What the test changes, so that a command runs in seconds:

- Set-up steps (`python3 -m venv`, `. .venv/bin/activate`, `pip install`) are
  skipped: the test runs in the environment they make. `python -m pytest` is
  this suite itself (CI runs it) and is not run again.
- `launch.train` and `launch.evaluate` run their config's `:smoke` variant
  (added to a variant it names: `digits.py:cond` runs `digits.py:cond,smoke`).
- `launch.sample` draws 8 images in batches of 8 with at most 3 steps.
- `launch.segment` reads a synthetic image written by the test.
- A `--workdir` that no earlier command trained is a copy of the digits
  smoke run (conftest's `digits_smoke_run`).
- The documents share one directory, README.md first: a command that an
  earlier document already ran there (the same words) is not run again.

A block preceded by `<!-- not run by tests: REASON -->` needs what a test
cannot have (a dataset download, published weights, a TPU pod or Slurm
cluster: tests/test_cluster_launchers.py rehearses those) or takes minutes
(the benchmarks): the flags of its `python -m launch.*` / `benchmarks.*`
commands are still parsed, `--config` overrides against the config file, in
a subprocess per module; a script it names must exist. Any other command in
a block that is not marked fails the test.

Every fenced `python` block runs in-process, a document's blocks in order in
one namespace, with the names they use but do not define (`model_fn`, `key`,
`params`, ...) defined by the test (`_placeholders`) on a tiny network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run by tests:\s*(.+?)\s*-->\s*$")
SETUP = (("python3", "-m", "venv"), (".",), ("pip",), ("python", "-m", "pip"))
SUITE = ("python", "-m", "pytest")


@dataclasses.dataclass(frozen=True)
class Block:
  """A fenced code block: its document, first line, language, text and the reason it is not run."""

  document: pathlib.Path
  line: int
  language: str
  text: str
  not_run: str | None

  def __str__(self):
    name = self.document.relative_to(REPO) if self.document.is_relative_to(REPO) else self.document
    return f"{name}:{self.line}"


def blocks(document: pathlib.Path) -> list[Block]:
  """The fenced blocks of a Markdown file, with the `not run offline` mark on the line above."""
  found, lines = [], document.read_text().splitlines()
  i = 0
  while i < len(lines):
    if match := re.match(r"^```(\w*)\s*$", lines[i]):
      end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
      mark = NOT_RUN.match(lines[i - 1].strip()) if i else None
      found.append(
        Block(
          document,
          i + 1,
          match.group(1),
          "\n".join(lines[i + 1 : end]),
          mark.group(1) if mark else None,
        )
      )
      i = end
    i += 1
  return found


def commands(block: Block) -> list[list[str]]:
  """The block's commands as argv lists: continuations joined, comments dropped, `&&` split."""
  text = re.sub(r"\\\n", " ", block.text)
  result = []
  for line in text.splitlines():
    words = shlex.split(line, comments=True)
    while words:
      head, words = (
        (words[: words.index("&&")], words[words.index("&&") + 1 :])
        if "&&" in words
        else (words, [])
      )
      result.append(head)
  return result


def _starts_with(argv: list[str], prefixes) -> bool:
  return any(tuple(argv[: len(prefix)]) == prefix for prefix in prefixes)


def _module(argv: list[str], package: str = "") -> str | None:
  """ "launch.train" for `python -m launch.train ...` (with `package` "launch."), else None."""
  if argv[:2] == ["python", "-m"] and len(argv) > 2 and argv[2].startswith(package):
    return argv[2]
  return None


def _launcher(argv: list[str]) -> str | None:
  return _module(argv, "launch.")


SH_BLOCKS = [b for d in DOCUMENTS for b in blocks(d) if b.language in ("sh", "bash", "shell")]
PYTHON_BLOCKS = [b for d in DOCUMENTS for b in blocks(d) if b.language == "python"]


def test_the_documents_have_blocks_to_check():
  assert len(SH_BLOCKS) >= 5 and len(PYTHON_BLOCKS) >= 5


def test_an_unmarked_command_the_test_cannot_run_fails_it(tmp_path):
  document = tmp_path / "doc.md"
  document.write_text(
    "Text.\n\n```sh\npython3 -m venv .venv && . .venv/bin/activate && \\\n"
    "    tensorboard --logdir=w  # watch\n```\n\n<!-- not run by tests: a pod -->\n"
    "```sh\nlaunch/tpu_pod.sh TPU ZONE c w\n```\n"
  )
  first, second = blocks(document)
  assert commands(first) == [
    ["python3", "-m", "venv", ".venv"],
    [".", ".venv/bin/activate"],
    ["tensorboard", "--logdir=w"],
  ]
  assert first.not_run is None and second.not_run == "a pod"
  with pytest.raises(AssertionError, match="tensorboard --logdir=w.*is not a launch"):
    _run_block_commands(first, Workspace(tmp_path, str(tmp_path), ""))


# --- sh blocks that run -------------------------------------------------------------------


def _flag(argv: list[str], name: str) -> str | None:
  for arg in argv:
    if arg.startswith(f"--{name}="):
      return arg.partition("=")[2]
  return None


def _with_flag(argv: list[str], name: str, value: str) -> list[str]:
  """argv with --name=value in place of its --name (which --config.KEY overrides must follow)."""
  flag = f"--{name}="
  if not any(a.startswith(flag) for a in argv):
    return [*argv, flag + value]
  return [flag + value if a.startswith(flag) else a for a in argv]


def _smoke_config(argv: list[str]) -> list[str]:
  """--config=PATH[:VARIANT] -> PATH:VARIANT,smoke (or PATH:smoke)."""
  path, _, variant = _flag(argv, "config").partition(":")
  variant = ",".join(v for v in (variant, "smoke") if v) if "smoke" not in variant else variant
  return _with_flag(argv, "config", f"{path}:{variant}")


@dataclasses.dataclass
class Workspace:
  """Where the documents' commands run: the directory, and what ran there."""

  cwd: pathlib.Path
  smoke_run: str  # a finished digits smoke run, copied for a workdir nothing trained
  segment_input: str  # an image for `launch.segment`
  trained: set[str] = dataclasses.field(default_factory=set)  # workdirs that exist
  ran: set[str] = dataclasses.field(default_factory=set)  # commands, as the documents write them

  def smoke_form(self, argv: list[str]) -> list[str]:
    """The command as the test runs it (the module docstring lists each change)."""
    launcher = _launcher(argv)
    argv = [sys.executable, *argv[1:]]
    if launcher is None:
      return argv
    workdir = _flag(argv, "workdir")
    if launcher == "launch.train":
      self.trained.add(workdir)
      return _smoke_config(argv)
    if workdir not in self.trained and not (self.cwd / workdir).exists():
      shutil.copytree(self.smoke_run, self.cwd / workdir)
      self.trained.add(workdir)
    if launcher == "launch.evaluate":
      return _smoke_config(argv)
    if launcher == "launch.sample":
      steps = min(int(_flag(argv, "steps") or 3), 3) or 3
      for name, value in (("num_samples", "8"), ("batch_size", "8"), ("steps", str(steps))):
        argv = _with_flag(argv, name, value)
      return argv
    if launcher == "launch.segment":
      return _with_flag(argv, "input", self.segment_input)
    return argv


def _run_block_commands(block: Block, workspace: Workspace) -> None:
  env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  for argv in commands(block):
    if _starts_with(argv, SETUP) or _starts_with(argv, (SUITE,)):
      continue
    assert _launcher(argv), (
      f"{block}: `{shlex.join(argv)}` is not a launch.* command, and its"
      " block is not marked `<!-- not run by tests: REASON -->`"
    )
    if shlex.join(argv) in workspace.ran:
      continue
    command = workspace.smoke_form(argv)
    result = subprocess.run(
      command, cwd=workspace.cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (
      f"{block}: `{shlex.join(command)}` failed:\n{result.stderr[-3000:]}"
    )
    workspace.ran.add(shlex.join(argv))


@pytest.fixture(scope="module")
def segment_input(tmp_path_factory) -> str:
  """A grayscale PNG for `launch.segment`, from the synthetic cells."""
  from PIL import Image  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  path = tmp_path_factory.mktemp("segment_input") / "cells.png"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (96, 96), np.uint8)).save(path)  # noise: shapes only
  return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, digits_smoke_run, segment_input) -> Workspace:
  cwd = tmp_path_factory.mktemp("documents")
  (cwd / "configs").symlink_to(REPO / "configs")
  return Workspace(cwd, digits_smoke_run, segment_input)


@pytest.mark.parametrize(
  "document",
  [d for d in DOCUMENTS if any(b.document == d for b in SH_BLOCKS)],
  ids=lambda d: d.name,
)
def test_commands_of_the_document_run(document, workspace):
  for block in (b for b in SH_BLOCKS if b.document == document and not b.not_run):
    _run_block_commands(block, workspace)


# --- sh blocks not run: their flags are parsed -----------------------------

_PARSE_FLAGS = """
import importlib, json, sys
from absl import flags
from ml_collections import config_flags

module, commands = json.loads(sys.argv[1])
importlib.import_module(module)  # defines the launcher's flags
for argv in commands:
  config_args = [a for a in argv if a.startswith("--config")]
  for arg in argv:
    if arg.startswith("--") and not arg.startswith("--config"):
      name, has_value, value = arg[2:].partition("=")
      flag = flags.FLAGS[name.removeprefix("no") if name not in flags.FLAGS else name]
      if has_value:
        flag.parser.parse(value)
  if config_args:  # as the launcher parses them, on fresh flag values
    argv = ["prog", *config_args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
print("parsed", len(commands))
"""


def test_commands_not_run_parse():
  by_launcher: dict[str, list[list[str]]] = {}
  for block in (b for b in SH_BLOCKS if b.not_run):
    for argv in commands(block):
      if _starts_with(argv, SETUP):
        continue
      if module := _module(argv, "launch.") or _module(argv, "benchmarks."):
        by_launcher.setdefault(module, []).append(argv[3:])
      elif argv[0] in ("sbatch", "bash") or argv[0].endswith(".sh"):
        script = next(a for a in argv if a.endswith((".sh", ".sbatch")))
        assert (REPO / script).is_file(), f"{block}: {script} does not exist"
  for launcher, argvs in by_launcher.items():
    result = subprocess.run(
      [sys.executable, "-c", _PARSE_FLAGS, json.dumps([launcher, argvs])],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 0, f"{launcher}: {result.stderr[-3000:]}"
    assert f"parsed {len(argvs)}" in result.stdout


# --- python blocks --------------------------------------------------------------------------


def _placeholders(document: pathlib.Path, directory: pathlib.Path) -> dict:
  """The names the document's Python blocks use without defining them.

  `model` / `params` a tiny Flax network on [B, 32, 32, 3] images; `model_fn`
  it with a learned-range variance output (the README's spec); `cfg` the digits
  smoke config; a random-weights Inception file under its published name.
  """
  import types  # noqa: PLC0415

  import flax.linen as nn  # noqa: PLC0415
  import grain  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from configs import digits  # noqa: PLC0415
  from diffusion_jax import data, parallel, sampling, schedules  # noqa: PLC0415
  from diffusion_jax.train import diffusion_task  # noqa: PLC0415

  class TinyEps(nn.Module):
    @nn.compact
    def __call__(self, x, t, y=None):
      return nn.Conv(x.shape[-1], (3, 3))(x) + nn.Dense(1)(t[:, None] / 1000.0)[:, None, None, :]

  key = jax.random.key(0)
  shape = (2, 32, 32, 3)
  model = TinyEps()
  params = model.init(key, jnp.zeros(shape), jnp.zeros((2,)))
  cfg = digits.get_config("smoke")
  names = dict(
    jax=jax,
    jnp=jnp,
    np=np,
    key=key,
    shape=shape,
    model=model,
    params=params,
    x_start=jax.random.normal(key, shape),
    t=jnp.array([10, 500]),
    noise=jax.random.normal(jax.random.key(1), shape),
    model_fn=lambda x, t: jnp.concatenate([model.apply(params, x, t), jnp.zeros_like(x)], -1),
    cond_model_fn=lambda x, t, y: model.apply(params, x, t, y),
    labels=jnp.array([0, 1]),
    w=1.0,
    num_classes=10,
    steps=sampling.respaced(schedules.get_schedule("linear", 1000), 10),
    cfg=cfg,
    batch_sharding=parallel.batch_sharding(parallel.make_mesh()),
  )
  text = document.read_text()
  if "manager.save" in text:  # docs/data.md: saving the data iterator beside the state
    train_state = jax.jit(diffusion_task.build(cfg).init_state)(jax.random.PRNGKey(0))
    names.update(
      ocp=ocp,
      grain=grain,
      step=1,
      train_state=train_state,
      manager=ocp.CheckpointManager(directory / "checkpoints"),
      iterator=data.make_train_iterator(data.DataConfig.from_mapping(cfg.data), 8),
      abstract_state=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), train_state
      ),
    )
  if "load_inception" in text:  # docs/evaluation.md: the published file's name, random weights
    import torch  # noqa: PLC0415

    from benchmarks import peers  # noqa: PLC0415
    from diffusion_jax.evaluation import inception  # noqa: PLC0415

    weights = peers.random_inception_state_dict()
    torch.save(
      {k: torch.from_numpy(v) for k, v in weights.items()}, directory / inception.WEIGHTS_FILE
    )
    rng = np.random.default_rng(0)
    names.update(
      images_uint8_NHWC=rng.integers(0, 256, (10, 32, 32, 3), np.uint8),
      real_pool=rng.normal(size=(10, 2048)).astype(np.float32),
      reference=types.SimpleNamespace(mu=np.zeros(2048), sigma=np.eye(2048)),
    )
  return names


@pytest.mark.parametrize(
  "document", sorted({b.document for b in PYTHON_BLOCKS}), ids=lambda d: d.name
)
def test_python_blocks_of_the_document_run(document, tmp_path, monkeypatch):
  """The document's blocks in order, in one namespace (later blocks use earlier ones' names)."""
  monkeypatch.chdir(tmp_path)
  namespace = _placeholders(document, tmp_path)
  for block in (b for b in PYTHON_BLOCKS if b.document == document):
    exec(compile(block.text, str(block), "exec"), namespace)  # noqa: S102
