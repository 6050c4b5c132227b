"""The Flax LPIPS (VGG16) against the `lpips` package's on the same random weights; its loader,
its config, and the consistency step that uses it as its metric."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import peers
from diffusion_jax.evaluation import lpips

SHIPPED = "weights/v0.1/vgg.pth"  # in the lpips wheel: the linear layers of LPIPS(net="vgg")


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|."""
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def torch_lpips():
  """lpips' LPIPS(net="vgg") with a random VGG16 (no download: pnet_rand) and random biases,
  and the linear layers the wheel ships."""
  peers.import_torchvision()
  import lpips as lpips_package  # noqa: PLC0415  (a test peer, never imported by the library)

  torch.manual_seed(0)
  model = lpips_package.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
  with torch.no_grad():
    for name, tensor in model.net.named_parameters():
      if name.endswith("bias"):
        tensor.uniform_(-0.1, 0.1)
  return model


@pytest.fixture(scope="module")
def state_dict(torch_lpips):
  return {k: v.numpy() for k, v in torch_lpips.state_dict().items()}


@pytest.fixture(scope="module")
def combined_file(torch_lpips, tmp_path_factory) -> str:
  """torch.save of the whole LPIPS(net="vgg") state dict."""
  path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.pth"
  torch.save(torch_lpips.state_dict(), path)
  return str(path)


def torchvision_file(state_dict, path) -> str:
  """The random VGG16 saved under torchvision's vgg16 names (features.{i}.*), with a classifier."""
  features = {
    re.sub(r"net\.slice\d\.", "features.", k): torch.from_numpy(v)
    for k, v in state_dict.items()
    if k.startswith("net.")
  }
  torch.save({**features, "classifier.0.weight": torch.zeros(4, 2)}, path)
  return str(path)


def shipped_lin_file() -> str:
  import lpips as lpips_package  # noqa: PLC0415

  return f"{lpips_package.__path__[0]}/{SHIPPED}"


def images(seed: int, shape) -> np.ndarray:
  """float32 NHWC in [-1, 1]."""
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def torch_distance(model, x_NxHxWx3, y_NxHxWx3) -> np.ndarray:
  to_torch = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))
  with torch.no_grad():
    return model(to_torch(x_NxHxWx3), to_torch(y_NxHxWx3)).numpy().reshape(-1)


@pytest.mark.parametrize("files", ["combined", "lin+torchvision"])
def test_lpips_matches_the_lpips_package(torch_lpips, state_dict, combined_file, files, tmp_path):
  paths = (
    (combined_file,)
    if files == "combined"
    else (shipped_lin_file(), torchvision_file(state_dict, tmp_path / "vgg16.pth"))
  )
  variables = lpips.load_lpips(*paths)
  x, y = images(0, (3, 64, 48, 3)), images(1, (3, 64, 48, 3))
  ours = np.asarray(jax.jit(lpips.LPIPS().apply)(variables, x, y))
  theirs = torch_distance(torch_lpips, x, y)
  assert ours.shape == (3,) and np.all(theirs > 0)
  assert relative_error(ours, theirs) < 1e-5


def test_lpips_of_an_image_and_itself_is_zero(combined_file):
  variables = lpips.load_lpips(combined_file)
  x = images(2, (2, 32, 32, 3))
  np.testing.assert_array_equal(lpips.LPIPS().apply(variables, x, x), np.zeros(2))
  np.testing.assert_array_equal(lpips.distance(variables, x[..., :1], x[..., :1], 32), np.zeros(2))


def test_distance_is_lpips_of_the_bilinear_resize(combined_file):
  """CM's code: jax.image.resize(..., "bilinear") to 224 before LPIPS; grayscale as 3 channels."""
  variables = lpips.load_lpips(combined_file)
  x, y = images(3, (2, 8, 8, 1)), images(4, (2, 8, 8, 1))
  resized = lambda a: jnp.repeat(jax.image.resize(a, (2, 40, 40, 1), "bilinear"), 3, axis=-1)
  np.testing.assert_allclose(
    lpips.distance(variables, x, y, 40),
    lpips.LPIPS().apply(variables, resized(x), resized(y)),
    rtol=1e-6,
  )


def test_the_gradient_is_finite_where_features_are_all_zero():
  features = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
  np.testing.assert_allclose(lpips.unit_normalize(features)[0, 0, 0], [0.6, 0.8, 0, 0], rtol=1e-6)
  grad = jax.grad(lambda f: jnp.sum(lpips.unit_normalize(f)))(features)
  assert np.all(np.isfinite(grad))


def test_files_that_are_not_lpips_weights_are_named(state_dict, tmp_path):
  lin_only = shipped_lin_file()
  with pytest.raises(
    ValueError,
    match=re.escape(f"{lin_only}: not the weights of lpips'") + ".*missing key net.slice1.0.weight",
  ):
    lpips.load_lpips(lin_only)
  vgg = torchvision_file(state_dict, tmp_path / "vgg16.pth")
  with pytest.raises(ValueError, match="missing key lin0.model.1.weight"):
    lpips.load_lpips(vgg)
  with pytest.raises(ValueError, match="'features.0.weight' is in two of the files"):
    lpips.load_lpips(vgg, vgg)
  missing = str(tmp_path / "absent.pth")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    lpips.load_lpips(lin_only, missing)


def _consistency_config(**distill):
  from configs import digits_consistency  # noqa: PLC0415

  config = digits_consistency.get_config("ict,smoke")
  config.distill.update(distill)
  return config


def test_the_lpips_metric_needs_its_weights():
  from diffusion_jax.distill import consistency_task  # noqa: PLC0415

  with pytest.raises(ValueError, match="distill.metric='lpips' needs distill.lpips_weights"):
    consistency_task.build(_consistency_config(metric="lpips"))


def test_a_consistency_step_with_the_lpips_metric(combined_file):
  """One jitted iCT step on the digits with LPIPS (random VGG16) at 16 x 16: finite, and it moves."""
  from diffusion_jax.distill import consistency_task  # noqa: PLC0415

  config = _consistency_config(metric="lpips", lpips_weights=combined_file, lpips_resolution=16)
  config.optim.warmup_steps = 0  # the first step's learning rate is then not 0
  experiment = consistency_task.build(config)
  state = experiment.init_state(jax.random.key(0))
  batch = {"image": jnp.asarray(images(5, (8, 8, 8, 1))), "label": jnp.zeros(8, jnp.int32)}
  new_state, metrics = jax.jit(experiment.train_step_fn())(state, batch)
  loss, grad_norm = metrics["loss"].compute(), metrics["grad_norm"].compute()
  assert np.isfinite(loss) and loss > 0 and np.isfinite(grad_norm) and grad_norm > 0
  assert int(metrics["skipped_steps"].count) == 0
  moved = jax.tree.map(
    lambda new, old: not np.array_equal(new, old), new_state.params, state.params
  )
  assert any(jax.tree.leaves(moved))
  jax.tree.map(
    np.testing.assert_array_equal,
    new_state.sampler_state.lpips_params,
    state.sampler_state.lpips_params,
  )
