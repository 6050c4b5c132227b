"""The Flax FID Inception against pytorch-fid's on the same random weights; its resizes against TF1's and torch's."""

import os
import re
import warnings

import jax
import numpy as np
import pytest
import torch

from benchmarks import peers
from diffusion_jax import parallel
from diffusion_jax.evaluation import inception, metrics


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|."""
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def uint8_images(seed: int, shape) -> np.ndarray:
  """Noise around a random colour, with a random contrast per image: images that differ after pooling."""
  rng = np.random.default_rng(seed)
  colour = rng.uniform(0, 255, (shape[0], 1, 1, shape[-1]))
  contrast = rng.uniform(0, 128, (shape[0], 1, 1, 1))
  return np.clip(colour + contrast * rng.normal(size=shape), 0, 255).astype(np.uint8)


SMALL = uint8_images(1, (9, 32, 32, 3))  # upsampled to 299
LARGE = uint8_images(2, (3, 320, 300, 3))  # downsampled, not square


@pytest.fixture(scope="module")
def state_dict():
  return peers.random_inception_state_dict()


@pytest.fixture(scope="module")
def variables(state_dict):
  return inception.params_from_state_dict(state_dict)


@pytest.fixture(scope="module")
def pytorch_fid_model(state_dict):
  """pytorch-fid's InceptionV3([pool3], resize_input, normalize_input) with our random weights."""
  peers.import_torchvision()
  from pytorch_fid import inception as pytorch_fid_inception  # noqa: PLC0415

  torch_state = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  with pytest.MonkeyPatch.context() as patch:  # fid_inception_v3 would download the weights
    patch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *_, **__: torch_state)
    model = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=True)
  return model.eval()


def pytorch_fid_outputs(model, images_NxHxWx3):
  """(pool3 [N, 2048], Mixed_6d.branch1x1 [N, 17, 17, 192]) from pytorch-fid, input u / 255."""
  captured = []
  branch = dict(model.named_modules())["blocks.2.6.branch1x1"]  # Mixed_6d
  hook = branch.register_forward_hook(lambda _, __, out: captured.append(out))
  x = torch.from_numpy(images_NxHxWx3).permute(0, 3, 1, 2).float() / 255
  with torch.no_grad():
    (pool,) = model(x)
  hook.remove()
  return pool[:, :, 0, 0].numpy(), captured[0].permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def one_device_features(variables):
  """Our features of SMALL and LARGE in "pytorch-fid" mode on one device (one compile: batch 3)."""
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  return [
    inception.inception_features(variables, images, "pytorch-fid", batch_size=3, mesh=mesh)
    for images in (SMALL, LARGE)
  ]


@pytest.mark.parametrize("which", [0, 1], ids=["upsample_32", "downsample_320x300"])
def test_features_match_pytorch_fid(pytorch_fid_model, state_dict, one_device_features, which):
  images = (SMALL, LARGE)[which]
  ours = one_device_features[which]
  pool, branch1x1 = pytorch_fid_outputs(pytorch_fid_model, images)
  # The random network must not wash the images out, or parity would prove little.
  assert np.std(pool, axis=0).mean() > 0.05 * np.abs(pool).mean()
  assert relative_error(ours["pool"], pool) < 1e-4
  logits = pool.astype(np.float64) @ state_dict["fc.weight"].T.astype(np.float64)  # no fc.bias
  assert relative_error(ours["logits"], logits) < 1e-4
  spatial = branch1x1[..., :7].reshape(len(images), 17 * 17 * 7)
  assert relative_error(ours["spatial"], spatial) < 1e-4
  assert {k: v.shape for k, v in ours.items()} == {
    "pool": (len(images), 2048),
    "logits": (len(images), 1008),
    "spatial": (len(images), 2023),
  }


def test_fid_and_is_of_two_image_sets_match_the_originals(
  pytorch_fid_model, state_dict, variables, one_device_features
):
  """Ours end to end (network + metrics) against pytorch-fid's FID and torch-fidelity's IS."""
  peers.import_torchvision()
  from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: PLC0415
  from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: PLC0415

  other = uint8_images(5, SMALL.shape)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  ours = [
    one_device_features[0],
    inception.inception_features(variables, other, "pytorch-fid", batch_size=3, mesh=mesh),
  ]
  theirs = [pytorch_fid_outputs(pytorch_fid_model, images)[0] for images in (SMALL, other)]
  gaussians = lambda pools: [s for p in pools for s in (np.mean(p, 0), np.cov(p, rowvar=False))]
  fid = metrics.frechet_distance(*gaussians([o["pool"].astype(np.float64) for o in ours]))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sqrtm's `disp` is deprecated; 9 images: singular
    expected_fid = calculate_frechet_distance(*gaussians([p.astype(np.float64) for p in theirs]))
  assert fid == pytest.approx(expected_fid, rel=1e-3) and fid > 0
  logits = np.concatenate([p @ state_dict["fc.weight"].T for p in theirs])  # unbiased, as IS
  expected_is = isc_features_to_metric(torch.from_numpy(logits), splits=2, shuffle=False)
  ours_is = metrics.inception_score(np.concatenate([o["logits"] for o in ours]), splits=2)
  assert ours_is[0] == pytest.approx(expected_is["inception_score_mean"], rel=1e-3)
  assert ours_is[1] == pytest.approx(expected_is["inception_score_std"], rel=1e-2, abs=1e-6)


def test_sharded_features_equal_one_device(variables, one_device_features):
  # 9 images over 8 devices: one full batch and one of 1 image padded to 8.
  mesh = parallel.make_mesh()
  assert mesh.shape[parallel.DATA_AXIS] == 8
  sharded = inception.inception_features(variables, SMALL, "pytorch-fid", batch_size=8, mesh=mesh)
  for name, value in one_device_features[0].items():
    assert sharded[name].shape == value.shape
    assert relative_error(sharded[name], value) < 1e-5, name


def test_apply_inception_under_jit_equals_batched_runs(variables, one_device_features):
  ours = jax.jit(inception.apply_inception, static_argnames="resize")(
    variables, LARGE, resize="pytorch-fid"
  )
  for name, value in one_device_features[1].items():
    assert relative_error(np.asarray(ours[name]), value) < 1e-5, name


RESIZE_SHAPES = [(32, 32), (320, 300), (17, 450), (299, 299)]


@pytest.mark.parametrize("height,width", RESIZE_SHAPES)
def test_tf_resize_equals_tf1_resize_bilinear(height, width):
  tf = pytest.importorskip("tensorflow")
  images = uint8_images(height * width, (2, height, width, 3))
  resized = tf.compat.v1.image.resize_bilinear(
    images.astype(np.float32), [299, 299], align_corners=False, half_pixel_centers=False
  )
  expected = (resized.numpy() - 128) / 128
  np.testing.assert_allclose(inception.preprocess(images, "tf"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("height,width", RESIZE_SHAPES)
def test_pytorch_fid_resize_equals_torch_interpolate(height, width):
  images = uint8_images(height * width, (2, height, width, 3))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  resized = torch.nn.functional.interpolate(
    x, size=(299, 299), mode="bilinear", align_corners=False
  )
  expected = (2 * resized - 1).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(
    inception.preprocess(images, "pytorch-fid"), expected, rtol=0, atol=1e-5
  )


def test_grayscale_is_three_equal_channels():
  gray = uint8_images(3, (2, 20, 24, 1))
  np.testing.assert_array_equal(
    inception.preprocess(gray), inception.preprocess(np.repeat(gray, 3, axis=-1))
  )


@pytest.mark.parametrize(
  "images,message",
  [
    (np.zeros((2, 32, 32, 3), np.float32), "float32 (2, 32, 32, 3)"),
    (np.zeros((32, 32, 3), np.uint8), "uint8 (32, 32, 3)"),
    (np.zeros((2, 32, 32, 4), np.uint8), "uint8 (2, 32, 32, 4)"),
  ],
)
def test_bad_images_are_named(images, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    inception.preprocess(images)


def test_unknown_resize_mode_lists_the_known_ones():
  with pytest.raises(ValueError, match="'bicubic'.*tf, pytorch-fid"):
    inception.preprocess(np.zeros((1, 8, 8, 3), np.uint8), "bicubic")


def broken(state_dict, case):
  state = dict(state_dict)
  if case == "missing":
    del state["Mixed_6c.branch7x7dbl_4.bn.running_var"]
    return state, "missing key Mixed_6c.branch7x7dbl_4.bn.running_var"
  if case == "unexpected":
    state["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    return state, "unexpected key 'AuxLogits.fc.weight'"
  state["Mixed_7b.branch3x3_2a.conv.weight"] = np.zeros((384, 384, 3, 1), np.float32)
  return state, (
    r"wrong shape for Mixed_7b.branch3x3_2a.conv.weight: "
    r"expected \(384, 384, 1, 3\), got \(384, 384, 3, 1\)"
  )


@pytest.mark.parametrize("case", ["missing", "unexpected", "wrong_shape"])
def test_state_dict_errors_name_the_key(state_dict, case):
  state, message = broken(state_dict, case)
  with pytest.raises(ValueError, match=message):
    inception.params_from_state_dict(state)


def test_parameter_tree_mirrors_torch_names(variables, state_dict):
  assert variables["batch_stats"]["Mixed_5b"]["branch_pool"]["bn"]["var"].shape == (32,)
  np.testing.assert_array_equal(
    variables["batch_stats"]["Mixed_5b"]["branch_pool"]["bn"]["var"],
    state_dict["Mixed_5b.branch_pool.bn.running_var"],
  )
  np.testing.assert_array_equal(
    variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"],
    state_dict["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state_dict["fc.weight"].T)


def test_load_inception_reads_a_pth_file(tmp_path, state_dict, variables):
  path = os.path.join(tmp_path, inception.WEIGHTS_FILE)
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
  loaded = inception.load_inception(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items() if k != "fc.bias"}, path)
  with pytest.raises(ValueError, match=f"(?s){inception.WEIGHTS_FILE}.*missing key fc.bias"):
    inception.load_inception(path)
