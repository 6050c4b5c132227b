"""Models from outside the registry ("package.module:factory", built modules), trusted only from
the user's own config; rescale_timesteps."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_iddpm, digits
from configs.eval import digits as eval_digits
from diffusion_jax import evaluation, models, runs
from diffusion_jax.segmentation import inference as seg_inference
from diffusion_jax.train import diffusion_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EchoT(nn.Module):
  """Outputs the timesteps it is fed, broadcast to the image: shows what the network sees."""

  channels: int = 3

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    bias = self.param("bias", nn.initializers.zeros, (self.channels,))
    t_Bx1x1x1 = jnp.asarray(t, jnp.float32)[:, None, None, None]
    return jnp.zeros(x.shape[:-1] + (self.channels,)) + t_Bx1x1x1 + bias


def echo_factory(channels: int = 3) -> nn.Module:
  return EchoT(channels)


def not_a_diffusion_model() -> nn.Module:
  return nn.Dense(3)


def test_factory_names_build_modules_with_the_config_fields():
  model = models.get_model({"name": "diffusion_jax.models.unet:UNet", "ch": 32, "ch_mult": [1, 2]})
  assert isinstance(model, models.UNet) and model.ch_mult == (1, 2)
  assert isinstance(models.get_model(f"{__name__}:echo_factory", channels=2), EchoT)


@pytest.mark.parametrize(
  "name, message",
  [
    ("no_such_package.nets:make", "cannot import 'make' from 'no_such_package.nets'"),
    ("diffusion_jax.models.unet:NoSuchNet", "cannot import 'NoSuchNet'"),
    ("diffusion_jax.models.unet:UNet", "does not take"),  # an unknown field
    (f"{__name__}:not_a_diffusion_model", "must take"),
  ],
)
def test_bad_factories_are_named(name, message):
  kwargs = {"width": 3} if name.endswith(":UNet") else {}
  with pytest.raises(ValueError, match=re.escape(message)):
    models.get_model(name, **kwargs)


def test_rescale_timesteps_reaches_the_network_in_training_and_sampling():
  """Experiment.model_apply is the one door to the network: train steps and apply_fn alike."""
  config = cifar10_iddpm.get_config("smoke")
  config.model = {"name": f"{__name__}:echo_factory", "channels": 6}
  exp = diffusion_task.build(config)
  assert exp.diffusion.rescale_timesteps and exp.diffusion.num_timesteps == 100
  params = {"bias": jnp.zeros(6)}
  x, t = jnp.zeros((2, 16, 16, 3)), jnp.array([0, 99])
  fns = exp.step_fns()
  for out in (
    exp.apply_fn(params, x, t),
    fns.apply(params, x, t, None, train=True, rngs={"dropout": jax.random.key(0)}),
  ):
    np.testing.assert_allclose(np.asarray(out)[:, 0, 0, 0], [0.0, 990.0])
  config.diffusion.rescale_timesteps = False
  out = diffusion_task.build(config).apply_fn(params, x, t)
  np.testing.assert_array_equal(np.asarray(out)[:, 0, 0, 0], [0, 99])


def test_docs_example_trains_a_module_from_outside_the_zoo(tmp_path):
  """The 10-line example of docs/model_zoo.md, run as written (into a temporary workdir)."""
  with open(os.path.join(REPO, "docs", "model_zoo.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  (example,) = [b for b in blocks if "train_and_evaluate" in b]
  assert len(example.strip().splitlines()) <= 12
  namespace = {}
  exec(example.replace('"workdirs/tiny"', repr(str(tmp_path))), namespace)  # noqa: S102
  state = namespace["state"]
  assert int(state.step) == digits.get_config("smoke").train.num_steps
  assert "Conv_0" in state.params and os.path.exists(tmp_path / "checkpoints")


# --- a factory named in a workdir's config.json runs only when trusted ---------------------------

FACTORY_CALLS = []  # what marker_factory was called with, in this process


def marker_factory(channels: int = 1) -> nn.Module:
  """A factory that leaves a trace when it runs (as any code in a shared workdir could)."""
  FACTORY_CALLS.append(channels)
  return EchoT(channels)


def not_a_module() -> str:
  return "a string"


@pytest.fixture
def workdir_naming_a_factory(tmp_path) -> str:
  """A workdir (config.json, no checkpoint) of a digits run whose model is marker_factory."""
  config = digits.get_config("smoke")
  config.model = {"name": f"{__name__}:marker_factory", "channels": 1}
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  FACTORY_CALLS.clear()
  return str(tmp_path)


@pytest.mark.parametrize(
  "load",
  [
    runs.load_ema_for_sampling,
    seg_inference.load,
    lambda workdir, **kwargs: evaluation.evaluate(
      evaluation.from_config_dict(eval_digits.get_config("smoke")), workdir, **kwargs
    ),
  ],
  ids=["sample", "segment", "evaluate"],
)
def test_workdir_factory_is_not_imported_without_trust(workdir_naming_a_factory, load):
  with pytest.raises(models.UntrustedModelCodeError) as error:
    load(workdir_naming_a_factory)
  message = str(error.value)
  assert f"'{__name__}:marker_factory'" in message and "--trust_model_code" in message
  assert os.path.join(workdir_naming_a_factory, "config.json") in message
  assert FACTORY_CALLS == []


def test_trusted_workdir_factory_is_built(workdir_naming_a_factory):
  with pytest.raises(FileNotFoundError, match="No checkpoint"):  # built, then nothing to restore
    runs.load_ema_for_sampling(workdir_naming_a_factory, trust_model_code=True)
  assert FACTORY_CALLS == [1]


@pytest.mark.parametrize(
  "name, trusted",
  [
    ("ddpm_cifar10", True),  # a zoo name
    ("diffusion_jax.models.unet:UNet", True),  # this package's module class (converted runs)
    ("diffusion_jax.models.zoo:get_model", False),  # this package, but a function
    ("diffusion_jax.files:write_text", False),  # this package, outside its models
  ],
)
def test_only_zoo_names_and_library_modules_need_no_trust(tmp_path, name, trusted):
  config = digits.get_config("smoke")
  config.model = {"name": name}
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  if trusted:
    assert runs.load_run_config(str(tmp_path)).model.name == name
  else:
    with pytest.raises(models.UntrustedModelCodeError, match=re.escape(name)):
      runs.load_run_config(str(tmp_path))


@pytest.mark.parametrize(
  "name, message",
  [
    (f"{__name__}:not_a_module", "returned a str, not a Flax module"),
    ("os:sep", "'sep' is a str, not a callable"),
  ],
)
def test_a_factory_must_build_a_flax_module(name, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    models.get_model(name)
