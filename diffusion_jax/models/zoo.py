"""The model zoo: an explicit registry of published architectures.

    model = get_model("ddpm_cifar10")                       # the paper's model
    model = get_model("ddpm_cifar10", ch=32, ch_mult=(1, 2))  # a tiny variant
    model = get_model(config.model)  # a mapping with `name` plus overrides
    model = get_model("my_package.nets:make_unet", width=64)  # your own module's factory

A factory runs code, so a factory named in a config that someone else wrote
(a workdir's config.json) is built only when the caller says it trusts it:
`check_trusted` refuses it otherwise, before anything is imported.
Parameter counts come from `jax.eval_shape`, so even the 300M-parameter
entries are counted without allocating a single weight.
"""

import dataclasses
import functools
import importlib
import inspect
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.config.models import ZOO_SETTINGS, is_factory, split_name

from diffusion_jax.models.ronneberger import RonnebergerUNet
from diffusion_jax.models.unet import UNet


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  """A published model: its constructor, its source and what it should weigh.

  Attributes:
    module: the Flax module class.
    kwargs: constructor fields reproducing the paper's model.
    paper: the source, with the section that specifies the model.
    input_shape: (H, W, C) of the images it was trained on.
    params: its exact parameter count (checked by tests/test_models.py).
    paper_params: the count the paper states, or "-" when it gives none.
    notes: what sets it apart.
  """

  module: type[nn.Module]
  kwargs: Mapping[str, Any]
  paper: str
  input_shape: tuple[int, int, int]
  params: int
  paper_params: str
  notes: str


_DDPM_PAPER = "Ho et al. 2020, DDPM, App. B"
_IDDPM_PAPER = "Nichol & Dhariwal 2021, Improved DDPM"
_ADM_PAPER = "Dhariwal & Nichol 2021, ADM (Diffusion Models Beat GANs)"

MODEL_ZOO: dict[str, ZooEntry] = {
  "ddpm_cifar10": ZooEntry(
    module=UNet,
    kwargs=ZOO_SETTINGS["ddpm_cifar10"].kwargs,
    paper=_DDPM_PAPER,
    input_shape=(32, 32, 3),
    params=35_746_307,
    paper_params="35.7M",
    notes="eps-prediction, 1 attention head at 16x16; = diffusers google/ddpm-cifar10-32",
  ),
  "ddpm_celebahq256": ZooEntry(
    module=UNet,
    kwargs=ZOO_SETTINGS["ddpm_celebahq256"].kwargs,
    paper=_DDPM_PAPER,
    input_shape=(256, 256, 3),
    params=113_673_219,
    paper_params="114M",
    notes="as ddpm_cifar10 with 6 levels, no dropout; = diffusers google/ddpm-celebahq-256",
  ),
  "ddpm_lsun256": ZooEntry(
    module=UNet,
    kwargs=ZOO_SETTINGS["ddpm_lsun256"].kwargs,
    paper=_DDPM_PAPER,
    input_shape=(256, 256, 3),
    params=113_673_219,
    paper_params="114M",
    notes="LSUN church / bedroom / cat; the network of ddpm_celebahq256",
  ),
  "iddpm_cifar10": ZooEntry(
    module=UNet,
    kwargs=ZOO_SETTINGS["iddpm_cifar10"].kwargs,
    paper=_IDDPM_PAPER,
    input_shape=(32, 32, 3),
    params=52_546_438,
    paper_params="-",
    notes="README flags of improved-diffusion: learned variance (6 output channels), "
    "AdaGN, 4 heads at 16x16 and 8x8, dropout 0.3",
  ),
  "iddpm_imagenet64": ZooEntry(
    module=UNet,
    kwargs=ZOO_SETTINGS["iddpm_imagenet64"].kwargs,
    paper=_IDDPM_PAPER,
    input_shape=(64, 64, 3),
    params=121_063_942,
    paper_params="-",
    notes="README flags of improved-diffusion: unconditional, learned variance, AdaGN, "
    "4 heads at 16x16 and 8x8",
  ),
  "adm_imagenet64_cond": ZooEntry(
    module=UNet,
    kwargs=ZOO_SETTINGS["adm_imagenet64_cond"].kwargs,
    paper=_ADM_PAPER,
    input_shape=(64, 64, 3),
    params=295_905_222,
    paper_params="296M",
    notes="1000 classes + a null label (768 parameters more than ADM), BigGAN up/down, "
    "64-channel heads at 32, 16 and 8",
  ),
  "unet_ronneberger": ZooEntry(
    module=RonnebergerUNet,
    kwargs=ZOO_SETTINGS["unet_ronneberger"].kwargs,
    paper="Ronneberger et al. 2015, U-Net, Sec. 2 and Fig. 1",
    input_shape=(572, 572, 1),
    params=31_030_658,
    paper_params="-",
    notes="segmentation, not diffusion: unpadded convs, 572x572 -> 388x388 logits",
  ),
}


class UntrustedModelCodeError(ValueError):
  """A config from a workdir names a model factory, and running its code was not allowed."""


def check_trusted(model: Mapping[str, Any], trust_model_code: bool, source: str) -> None:
  """Refuses a model section that names a factory unless `trust_model_code`.

  Building such a model imports the factory's module and calls it: code from
  whoever wrote `source` (e.g. a shared workdir's config.json). Zoo names and
  this package's own module classes (`diffusion_jax.models.unet:UNet`, what
  launch.convert's workdirs name) are always fine. Call it before `get_model`
  on any config the user did not write.

  Raises:
    UntrustedModelCodeError: naming the factory, `source` and the flag that allows it.
  """
  name = str(model.get("name", ""))
  if is_factory(name) and not trust_model_code and not _is_library_module_class(name):
    raise UntrustedModelCodeError(
      f"{source} names the model factory {name!r}; building the model would import and run"
      " that code. Pass --trust_model_code (trust_model_code=True in Python) if you trust it."
    )


def _is_library_module_class(spec: str) -> bool:
  """Whether factory `spec` is a Flax module class of diffusion_jax.models (no foreign code).

  Only modules of this package are imported to find out; constructing a
  module class only stores its fields.
  """
  module_name, _, attribute = spec.partition(":")
  if module_name != __package__ and not module_name.startswith(f"{__package__}."):
    return False
  try:
    factory = getattr(importlib.import_module(module_name), attribute)
  except (ImportError, AttributeError):
    return False
  return isinstance(factory, type) and issubclass(factory, nn.Module)


def lookup(name: str) -> ZooEntry:
  """The zoo entry called `name`; a ValueError lists the known names."""
  if name not in MODEL_ZOO:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_ZOO)}")
  return MODEL_ZOO[name]


def get_model(spec: str | Mapping[str, Any], **overrides: Any) -> nn.Module:
  """Builds a zoo model, with constructor fields overridden, or a module from its factory.

  Args:
    spec: a zoo name, a factory "package.module:factory" (imported, called
      with the overrides; it must return a Flax module taking
      (x, t, y=None, train=False)), or a mapping (dict, ml_collections.ConfigDict)
      holding `name` and any overrides (e.g. the training config's `config.model`).
    **overrides: fields of the module replacing the entry's (they win over
      the mapping's). Lists become tuples, so configs may hold either.

  Raises:
    ValueError: for an unknown name, a mapping without `name`, an override
      that is not a field of the module (the error names it), or a factory
      that cannot be imported or does not build such a module.
  """
  if not isinstance(spec, str):
    spec, fields = split_name(spec)
    overrides = {**fields, **overrides}
  overrides = {key: tuple(v) if isinstance(v, list) else v for key, v in overrides.items()}
  if is_factory(spec):
    return _from_factory(spec, overrides)
  entry = lookup(spec)
  fields = {f.name for f in dataclasses.fields(entry.module)} - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
      f"unknown override(s) {unknown} for model {spec!r} ({entry.module.__name__}); "
      f"valid fields: {sorted(fields)}"
    )
  return entry.module(**{**entry.kwargs, **overrides})


def _from_factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
  """factory(**kwargs) for spec "package.module:factory", checked to be a diffusion model."""
  module_name, _, attribute = spec.partition(":")
  try:
    factory = getattr(importlib.import_module(module_name), attribute)
  except (ImportError, AttributeError) as e:
    raise ValueError(
      f"model {spec!r}: cannot import {attribute!r} from {module_name!r}: {e}"
    ) from e
  if not callable(factory):
    raise ValueError(
      f"model {spec!r}: {attribute!r} is a {type(factory).__name__}, not a"
      " callable returning a Flax module"
    )
  try:
    model = factory(**kwargs)
  except TypeError as e:
    raise ValueError(f"model {spec!r}: the factory does not take {sorted(kwargs)}: {e}") from e
  if not isinstance(model, nn.Module):
    raise ValueError(
      f"model {spec!r}: the factory returned a {type(model).__name__}, not a Flax module"
    )
  try:
    inspect.signature(model.__call__).bind(None, None, None, train=False)
  except TypeError as e:
    raise ValueError(
      f"model {spec!r}: {type(model).__name__} must take (x, t, y=None, train=False): {e}"
    ) from e
  return model


def abstract_init(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[Any, Any]:
  """(output, variables) of `model` on one (H, W, C) image, as ShapeDtypeStructs.

  Traced with jax.eval_shape: nothing is allocated or computed.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  inputs = (x, jax.ShapeDtypeStruct((1,), jnp.int32)) if isinstance(model, UNet) else (x,)
  return jax.eval_shape(model.init_with_output, jax.random.key(0), *inputs)


@functools.cache
def entry_shapes(name: str) -> tuple[Any, Any]:
  """abstract_init of zoo entry `name` at its input shape (traced once)."""
  return abstract_init(get_model(name), lookup(name).input_shape)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def param_count(name: str) -> int:
  """Parameter count of zoo entry `name`, from shapes only."""
  return count_params(entry_shapes(name)[1]["params"])


def zoo_table() -> str:
  """The zoo as a markdown table, parameter counts computed from shapes."""
  rows = [
    "| name | paper | params | paper's count | input (HxWxC) | notes |",
    "|---|---|---:|---:|---|---|",
  ]
  for name, entry in MODEL_ZOO.items():
    shape = "x".join(map(str, entry.input_shape))
    cells = [
      f"`{name}`",
      entry.paper,
      f"{param_count(name):,}",
      entry.paper_params,
      shape,
      entry.notes,
    ]
    rows.append(f"| {' | '.join(cells)} |")
  return "\n".join(rows)
