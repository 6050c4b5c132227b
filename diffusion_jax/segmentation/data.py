"""The segmentation input pipeline: image/mask pairs -> weight maps -> augmented tiles -> batches.

    source ─► this process's shard ─► shuffle (per epoch) ─► repeat
           ─► Prepare (channels, resize, weight map: Sec. 3 eq. 2)
           ─► RandomTile (shift, rotation, elastic, intensity: Sec. 3.1) ─► batch
           ─► {"image": f32 [B, T, T, C] in [-1, 1], "mask": i32 [B, O, O],
               "weights": f32 [B, O, O]}

T is the network's input tile, O its output (T minus the context the unpadded
convolutions eat). As in the diffusion pipeline, every random choice is a
function of the order's seed and the record's position, so the iterator's
state resumes it exactly, and a run continued on another number of processes
goes on in a fresh order (`data.TrainIterator`).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from diffusion_jax.config.segmentation import AugmentConfig, SegmentationDataConfig, WeightMapConfig
from diffusion_jax.data import pipeline as image_pipeline
from diffusion_jax.segmentation import augment, sources, weights


def make_source(config: SegmentationDataConfig, split: str, num_classes: int):
  """The checked source of `split` (`sources.CheckedSource`)."""
  if config.source == "cells":
    count = config.num_images if split == config.split else config.num_eval_images
    return sources.cells_source(config.seed, split, count, config.image_size, num_classes)
  if config.source == "tfds":
    return sources.tfds_source(
      config.name, split, config.image_key, config.mask_key, num_classes, config.mask_offset
    )
  return sources.folder_source(f"{config.path}/{split}", num_classes)


@dataclasses.dataclass(frozen=True)
class Prepare(grain.transforms.Map):
  """A record -> {"image": f32 [H, W, C] in [0, 1], "mask": i32 [H, W], "weights": f32 [H, W]}."""

  num_channels: int
  resize: int
  num_classes: int
  weight_map: WeightMapConfig

  def map(self, record):
    image, mask = sources.prepare_image(
      record["image"], record["mask"], self.num_channels, self.resize
    )
    return {
      "image": image,
      "mask": mask,
      "weights": weights.weight_map(mask, self.num_classes, self.weight_map),
    }


@dataclasses.dataclass(frozen=True)
class RandomTile(grain.transforms.RandomMap):
  """A prepared whole image -> one augmented training tile (`augment.random_tile`), in [-1, 1]."""

  tile: int
  output: int
  augment: AugmentConfig

  def random_map(self, record, rng: np.random.Generator):
    image, mask, weight = augment.random_tile(
      rng, record["image"], record["mask"], record["weights"], self.tile, self.output, self.augment
    )
    return {"image": image * 2.0 - 1.0, "mask": mask, "weights": weight}


@dataclasses.dataclass(frozen=True)
class TileShape:
  """The network's tile sizes: `tile` in, `output` out (`models.valid_output_size`)."""

  tile: int
  output: int


def make_train_iterator(
  config: SegmentationDataConfig,
  global_batch_size: int,
  tiles: TileShape,
  num_classes: int,
  weight_map: WeightMapConfig,
  augment_config: AugmentConfig,
  shard_options: grain.sharding.ShardOptions | None = None,
) -> image_pipeline.TrainIterator:
  """An endless, checkpointable iterator over this process's share of the training tiles.

  Returns batches {"image": float32 [B, T, T, C] in [-1, 1], "mask": int32
  [B, O, O], "weights": float32 [B, O, O]}, B = global_batch_size / process
  count, T = tiles.tile, O = tiles.output.
  """
  shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  batch_size = image_pipeline.local_batch_size(global_batch_size, shard_options.shard_count)
  records = image_pipeline.shard(
    grain.MapDataset.source(make_source(config, config.split, num_classes)), shard_options
  )
  if len(records) == 0:
    raise ValueError(
      f"process {shard_options.shard_index} of {shard_options.shard_count} has no"
      " examples: the dataset is smaller than the process count"
    )
  read_options = grain.ReadOptions(
    num_threads=config.num_threads, prefetch_buffer_size=2 * config.num_threads
  )

  def make_order(start_step: int) -> grain.DatasetIterator:
    dataset = records.seed(image_pipeline.order_seed(config.seed, start_step))
    if config.shuffle:
      dataset = dataset.shuffle()
    dataset = (
      dataset.repeat()
      .map(Prepare(config.num_channels, config.resize, num_classes, weight_map))
      .random_map(RandomTile(tiles.tile, tiles.output, augment_config))
      .batch(batch_size, drop_remainder=True)
    )
    return iter(dataset.to_iter_dataset(read_options))

  return image_pipeline.TrainIterator(make_order)


def load_eval_set(config: SegmentationDataConfig, num_classes: int):
  """The held-out images: (images [f32 [H, W, C] in [-1, 1]], masks [i32 [H, W]]), whole.

  The first `config.eval_images` of `config.eval_split` (all when 0); sizes may differ.
  """
  source = make_source(config, config.eval_split, num_classes)
  count = min(len(source), config.eval_images or len(source))
  images, masks = [], []
  for index in range(count):
    record = source[index]
    image, mask = sources.prepare_image(
      record["image"], record["mask"], config.num_channels, config.resize
    )
    images.append(image * 2.0 - 1.0)
    masks.append(mask)
  return images, masks
