"""Tests of the input pipeline: sources, transforms, order, resume, sharding."""

import re

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image
from sklearn import datasets as sk_datasets

from diffusion_jax.data import (
  DataConfig,
  make_eval_iterator,
  make_global_batch,
  make_train_iterator,
  num_examples,
  pipeline,
  sources,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _digits(**overrides) -> DataConfig:
  """A small, fast digits config; `overrides` replace its fields."""
  fields = dict(source="digits", image_size=8, num_channels=1, num_threads=2)
  return DataConfig(**{**fields, **overrides})


def _take(config: DataConfig, batch_size: int, n: int, **kwargs):
  iterator = make_train_iterator(config, batch_size, **kwargs)
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(actual, expected):
  assert len(actual) == len(expected)
  for got, want in zip(actual, expected):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def _digits_in_model_range(split: str = "train"):
  """A digits split as the pipeline should give it unchanged: [N, 8, 8, 1]."""
  digits = sk_datasets.load_digits()
  rows = sources.digits_split_indices(split)
  images = np.round(digits.images[rows] * (255 / 16)).astype(np.uint8)
  return images[..., None] / 127.5 - 1.0, digits.target[rows]


# Config.


def test_config_from_configdict():
  mapping = ml_collections.ConfigDict({"source": "digits", "image_size": 16})
  config = DataConfig.from_mapping(mapping)
  assert (config.source, config.image_size) == ("digits", 16)


def test_config_from_mapping_names_unknown_key():
  with pytest.raises(ValueError, match="image_sise"):
    DataConfig.from_mapping({"source": "digits", "image_sise": 16})


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(source="imagenet"), "unknown data source 'imagenet'"),
    (dict(image_size=0), "image_size"),
    (dict(num_channels=2), "num_channels"),
    (dict(source="folder"), "needs a `path`"),
    (dict(source="tfds"), "needs a dataset `name`"),
  ],
)
def test_config_rejects_bad_values(fields, message):
  with pytest.raises(ValueError, match=message):
    DataConfig(**fields)


def test_batch_must_divide_among_processes():
  options = grain.sharding.ShardOptions(shard_index=0, shard_count=2)
  with pytest.raises(ValueError, match="process count 2"):
    make_train_iterator(_digits(), 7, shard_options=options)


# Digits: content, shapes, order.


def test_digits_unshuffled_unflipped_batches_are_the_dataset():
  config = _digits(shuffle=False, random_flip=False)
  batches = _take(config, 16, 2)
  images, labels = _digits_in_model_range()
  for i, batch in enumerate(batches):
    rows = slice(16 * i, 16 * (i + 1))
    assert batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    np.testing.assert_allclose(batch["image"], images[rows], atol=1e-6)
    np.testing.assert_array_equal(batch["label"], labels[rows])


def test_digits_resized_rgb_batch_shape_and_range():
  (batch,) = _take(_digits(image_size=32, num_channels=3), 64, 1)
  image, label = batch["image"], batch["label"]
  assert image.shape == (64, 32, 32, 3) and image.dtype == np.float32
  assert label.shape == (64,) and label.dtype == np.int32
  assert image.min() == -1.0 and image.max() == 1.0
  assert set(label) <= set(range(10)) and len(set(label)) > 1
  # Grayscale repeated to three equal channels.
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_same_seed_same_batches_other_seed_other_order():
  first = _take(_digits(seed=3), 32, 3)
  _assert_same_batches(_take(_digits(seed=3), 32, 3), first)
  other = _take(_digits(seed=4), 32, 3)
  assert not np.array_equal(other[0]["label"], first[0]["label"])


def test_each_epoch_is_a_new_permutation():
  # One batch of the whole dataset is one epoch.
  size = num_examples(_digits())
  assert size == len(sk_datasets.load_digits().target) - 300  # the train split
  epoch_1, epoch_2 = _take(_digits(random_flip=False), size, 2)
  _, labels = _digits_in_model_range()
  for epoch in (epoch_1, epoch_2):
    np.testing.assert_array_equal(np.sort(epoch["label"]), np.sort(labels))
  assert not np.array_equal(epoch_1["label"], epoch_2["label"])


@pytest.mark.parametrize("shuffle", [False, True])
def test_random_flip_mirrors_about_half_the_images(shuffle):
  (plain,) = _take(_digits(shuffle=shuffle, random_flip=False), 256, 1)
  (flipped,) = _take(_digits(shuffle=shuffle, random_flip=True), 256, 1)
  np.testing.assert_array_equal(flipped["label"], plain["label"])
  per_image = (1, 2, 3)
  same = np.all(flipped["image"] == plain["image"], axis=per_image)
  mirrored = np.all(flipped["image"] == plain["image"][:, :, ::-1], per_image)
  assert np.all(same | mirrored)
  assert 64 < np.sum(mirrored & ~same) < 192


# Resume.


def test_resume_from_get_state():
  config = _digits()
  unbroken = make_train_iterator(config, 32)
  for _ in range(5):
    next(unbroken)
  state = unbroken.get_state()
  expected = [next(unbroken) for _ in range(4)]

  resumed = make_train_iterator(config, 32)
  resumed.set_state(state)
  _assert_same_batches([next(resumed) for _ in range(4)], expected)


def test_resume_through_orbax_checkpoint_manager(tmp_path):
  config = _digits(image_size=16, num_channels=3)
  unbroken = make_train_iterator(config, 32)
  for _ in range(5):
    next(unbroken)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    save = grain.checkpoint.CheckpointSave(unbroken)
    manager.save(5, args=ocp.args.Composite(data=save))
    manager.wait_until_finished()
  expected = [next(unbroken) for _ in range(4)]

  resumed = make_train_iterator(config, 32)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restore = grain.checkpoint.CheckpointRestore(resumed)
    restored = manager.restore(5, args=ocp.args.Composite(data=restore))
  assert restored["data"] is resumed
  _assert_same_batches([next(resumed) for _ in range(4)], expected)


# Sharding over processes and devices.


def test_each_process_reads_its_own_half():
  config = _digits(shuffle=False, random_flip=False)
  images, labels = _digits_in_model_range()
  half = 1497 // 2  # of the train split
  for index in (0, 1):
    options = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
    (batch,) = _take(config, 16, 1, shard_options=options)
    rows = slice(index * half, index * half + 8)
    assert batch["image"].shape == (8, 8, 8, 1)
    np.testing.assert_allclose(batch["image"], images[rows], atol=1e-6)
    np.testing.assert_array_equal(batch["label"], labels[rows])


def test_digits_splits_are_disjoint_and_cover_the_dataset():
  train_rows, test_rows = (sources.digits_split_indices(s) for s in ("train", "test"))
  assert len(test_rows) == 300 and len(train_rows) == 1497
  np.testing.assert_array_equal(np.sort(np.concatenate([train_rows, test_rows])), np.arange(1797))
  assert test_rows.max() > 1700 and test_rows.min() < 100  # drawn from all writers' blocks
  train = _take(_digits(split="train", shuffle=False, random_flip=False), 1497, 1)[0]
  test = list(make_eval_iterator(_digits(split="test"), 300))[0]
  np.testing.assert_allclose(train["image"], _digits_in_model_range("train")[0], atol=1e-6)
  images, labels = _digits_in_model_range("test")
  np.testing.assert_allclose(test["image"], images, atol=1e-6)
  np.testing.assert_array_equal(test["label"], labels)
  with pytest.raises(ValueError, match="unknown digits split 'validation'"):
    num_examples(_digits(split="validation"))


@pytest.mark.parametrize("process_count, num_examples", [(1, 0), (3, 0), (3, 100)])
def test_eval_iterator_yields_every_example_once_over_all_processes(process_count, num_examples):
  """300 test digits (or the first 100) in global batches of 48: padded, masked, indexed."""
  images, labels = _digits_in_model_range("test")
  expected = num_examples or 300
  per_process = []
  for index in range(process_count):
    options = grain.sharding.ShardOptions(index, process_count, drop_remainder=False)
    per_process.append(
      list(make_eval_iterator(_digits(split="test"), 48, options, num_examples=num_examples))
    )
  assert len({len(batches) for batches in per_process}) == 1  # hosts stay in step
  batches = [b for process_batches in per_process for b in process_batches]
  seen = np.concatenate([b["image"][b["mask"]] for b in batches])
  seen_labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_allclose(seen, images[:expected], atol=1e-6)  # in order, none twice
  np.testing.assert_array_equal(seen_labels, labels[:expected])
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(
    index[np.concatenate([b["mask"] for b in batches])], np.arange(expected)
  )  # each example's position in the split
  assert (index[~np.concatenate([b["mask"] for b in batches])] == -1).all()
  last = per_process[-1][-1]
  assert last["image"].shape == (48 // process_count, 8, 8, 1) and not last["mask"].all()


@pytest.mark.parametrize(
  "drop_remainder, want",
  [
    (True, [[0, 1, 2], [3, 4, 5], [6, 7, 8]]),
    (False, [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]),
  ],
)
def test_shards_are_contiguous_and_disjoint(drop_remainder, want):
  dataset = grain.MapDataset.range(10)
  for index in range(3):
    options = grain.sharding.ShardOptions(index, 3, drop_remainder)
    assert list(pipeline.shard(dataset, options)) == want[index]


def test_make_global_batch_shards_rows_over_data_axis():
  assert jax.device_count() == 8, "conftest.py fakes 8 CPU devices"
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  (local,) = _take(_digits(), 16, 1)

  batch = make_global_batch(local, sharding)
  for key in ("image", "label"):
    array = batch[key]
    assert array.shape == local[key].shape
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), local[key])
    for piece in array.addressable_shards:
      assert piece.data.shape[0] == 2
      np.testing.assert_array_equal(piece.data, local[key][piece.index])


# TFDS (mocked: random examples of the real features, nothing downloaded).


@pytest.mark.parametrize("image_size", [32, 20])
def test_tfds_cifar10(image_size):
  config = DataConfig(source="tfds", name="cifar10", image_size=image_size, num_threads=2)
  with tfds.testing.mock_data(num_examples=12):
    assert num_examples(config) == 12
    (batch,) = _take(config, 8, 1)
  assert batch["image"].shape == (8, image_size, image_size, 3)
  assert batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() <= batch["image"].max() <= 1.0
  assert batch["label"].dtype == np.int32


def test_tfds_unflipped_unresized_images_are_the_records():
  config = DataConfig(source="tfds", name="cifar10", shuffle=False, random_flip=False)
  with tfds.testing.mock_data(num_examples=4):
    source = tfds.data_source("cifar10", split="train")
    records = [source[i] for i in range(4)]
    (batch,) = _take(config, 4, 1)
  want = np.stack([r["image"] for r in records]) / 127.5 - 1.0
  np.testing.assert_allclose(batch["image"], want, atol=1e-6)
  np.testing.assert_array_equal(batch["label"], [r["label"] for r in records])


@pytest.mark.parametrize("num_channels", [1, 3])
def test_tfds_mnist_channels(num_channels):
  config = DataConfig(source="tfds", name="mnist", image_size=28, num_channels=num_channels)
  with tfds.testing.mock_data(num_examples=8):
    (batch,) = _take(config, 4, 1)
  assert batch["image"].shape == (4, 28, 28, num_channels)


def test_tfds_unknown_name_is_named():
  config = DataConfig(source="tfds", name="no_such_dataset_xyz")
  with pytest.raises(ValueError, match="TFDS dataset 'no_such_dataset_xyz'"):
    make_train_iterator(config, 4)


# Image folders.


def _stripes(colours, width, height, vertical=True):
  """An RGB image of equal stripes, left to right (or top to bottom)."""
  n = len(colours)
  size = (width // n, height) if vertical else (width, height // n)
  pixels = [np.full((size[1], size[0], 3), c, np.uint8) for c in colours]
  return Image.fromarray(np.concatenate(pixels, axis=1 if vertical else 0))


def _assert_filled_with(image_HxWxC, colour):
  """Every pixel of a [-1, 1] image is `colour` (0..255, one per channel)."""
  want = np.broadcast_to(np.asarray(colour) / 127.5 - 1.0, image_HxWxC.shape)
  np.testing.assert_allclose(image_HxWxC, want, atol=1e-6)


def _folder(tmp_path, **overrides) -> DataConfig:
  fields = dict(
    source="folder",
    path=str(tmp_path),
    image_size=16,
    num_threads=2,
    shuffle=False,
    random_flip=False,
  )
  return DataConfig(**{**fields, **overrides})


def test_folder_finds_images_recursively_and_crops_the_centre(tmp_path):
  (tmp_path / "b" / "c").mkdir(parents=True)
  # Only the middle of each image survives: a crop of the edges would show
  # red or blue (wide), blue or green (tall), and so would a squashed resize.
  _stripes([RED] + [GREEN] * 4 + [BLUE], 120, 30).save(tmp_path / "a_wide.png")
  _stripes([BLUE] + [RED] * 4 + [GREEN], 30, 120, vertical=False).save(tmp_path / "b" / "tall.PNG")
  Image.new("L", (40, 40), 51).save(tmp_path / "b" / "c" / "gray.bmp")
  (tmp_path / "notes.txt").write_text("not an image")
  config = _folder(tmp_path)
  assert num_examples(config) == 3

  (batch,) = _take(config, 3, 1)
  assert batch["image"].shape == (3, 16, 16, 3)
  # Sorted by relative path: a_wide.png, b/c/gray.bmp, b/tall.PNG.
  for image, colour in zip(batch["image"], [GREEN, (51, 51, 51), RED]):
    _assert_filled_with(image, colour)
  np.testing.assert_array_equal(batch["label"], [0, 0, 0])


def test_folder_rgb_to_one_channel(tmp_path):
  Image.new("RGB", (20, 10), RED).save(tmp_path / "red.png")
  (batch,) = _take(_folder(tmp_path, num_channels=1), 2, 1)
  assert batch["image"].shape == (2, 16, 16, 1)
  luma_of_red = round(255 * 299 / 1000)  # ITU-R 601: 0.299 R.
  for image in batch["image"]:
    _assert_filled_with(image, [luma_of_red])


def test_folder_missing(tmp_path):
  missing = tmp_path / "nowhere"
  message = f"data folder '{missing}' does not exist"
  with pytest.raises(FileNotFoundError, match=re.escape(message)):
    make_train_iterator(_folder(missing), 2)


def test_folder_without_images(tmp_path):
  (tmp_path / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match="holds no image files"):
    make_train_iterator(_folder(tmp_path), 2)


def test_folder_corrupted_image_is_named(tmp_path):
  Image.new("RGB", (16, 16), RED).save(tmp_path / "a_good.png")
  (tmp_path / "b_bad.jpg").write_bytes(b"\xff\xd8 truncated, not a jpeg")
  iterator = make_train_iterator(_folder(tmp_path), 2)
  with pytest.raises(ValueError, match="b_bad.jpg"):
    next(iterator)
