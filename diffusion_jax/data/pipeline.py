"""The training input pipeline: per-host, infinite, deterministic, resumable.

    source ─► this process's shard ─► shuffle (per epoch) ─► repeat
           ─► Preprocess ─► RandomHorizontalFlip ─► batch ─► (threads)
           ─► to_model_range ─► {"image": f32 [B, S, S, C], "label": i32 [B]}

Every random choice is a function of the order's seed and the record's
position, so the iterator's state is just that position (and the step at which
its order started): `get_state()` / `set_state()` (or Orbax with
`grain.checkpoint.CheckpointSave` / `CheckpointRestore`) resume it exactly.
A run's order starts at step 0, seeded by `config.seed`; a run continued on
another number of processes, whose shards no longer match the saved
positions, starts a fresh order at its step (`TrainIterator.restart_order`).
`make_global_batch` then joins the hosts' batches into one `jax.Array` sharded
over the mesh.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np

from diffusion_jax.data import transforms
from diffusion_jax.config.data import DataConfig
from diffusion_jax.data.sources import make_source


def local_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
  """The share of `global_batch_size` read by each of `process_count` hosts.

  `process_count` defaults to `jax.process_count()`.
  """
  count = process_count or jax.process_count()
  if global_batch_size <= 0 or global_batch_size % count:
    raise ValueError(
      f"global batch size {global_batch_size} must be a positive multiple"
      f" of the process count {count}"
    )
  return global_batch_size // count


def shard(
  dataset: grain.MapDataset, shard_options: grain.sharding.ShardOptions
) -> grain.MapDataset:
  """This process's contiguous slice of `dataset`.

  With `shard_options.drop_remainder` every process gets len // shard_count
  examples, so that all hosts agree on the length of an epoch; without, the
  first len % shard_count processes get one more.
  """
  count, index = shard_options.shard_count, shard_options.shard_index
  per_shard, extra = divmod(len(dataset), count)
  if shard_options.drop_remainder:
    extra = 0
  start = index * per_shard + min(index, extra)
  stop = start + per_shard + (index < extra)
  return dataset[start:stop]


def order_seed(seed: int, start_step: int) -> int:
  """The seed of the data order starting at `start_step`: `seed` for step 0.

  Any other start step draws a new 32-bit seed from (seed, start_step), the
  same on every process and machine.
  """
  if start_step == 0:
    return seed
  return int(np.random.SeedSequence([seed, start_step]).generate_state(1)[0])


def _records(
  config: DataConfig, shard_options: grain.sharding.ShardOptions, seed: int
) -> grain.MapDataset:
  """This process's endless prepared uint8 records, in the order of `seed`."""
  dataset = shard(grain.MapDataset.source(make_source(config)), shard_options)
  if len(dataset) == 0:
    raise ValueError(
      f"process {shard_options.shard_index} of {shard_options.shard_count}"
      " has no examples: the dataset is smaller than the process count"
    )
  dataset = dataset.seed(seed)
  if config.shuffle:
    dataset = dataset.shuffle()
  dataset = dataset.repeat()  # Reseeds the shuffle and flips every epoch.
  dataset = dataset.map(transforms.Preprocess(config.image_size, config.num_channels))
  if config.random_flip:
    dataset = dataset.random_map(transforms.RandomHorizontalFlip())
  return dataset


ORDER_START_STEP = "order_start_step"  # TrainIterator's key in grain's state


class TrainIterator(grain.DatasetIterator):
  """The training batches in one data order, and the step that order started at.

  Its state is grain's position in the order plus `order_start_step`, so a
  checkpoint names its order and `set_state` rebuilds it; a state without
  the key (saved before it existed) is a position in the order of step 0.
  """

  def __init__(
    self,
    make_order: Callable[[int], grain.DatasetIterator],
    start_step: int = 0,
  ):
    """`make_order(start_step)`: the batches of the order starting there."""
    super().__init__()  # closable by grain's __del__ even if make_order raises (no data)
    self._make_order = make_order
    self.start_step = start_step
    super().__init__(make_order(start_step))

  def _use_order(self, start_step: int) -> None:
    """Goes on with the order starting at `start_step`, from its beginning."""
    self._parent.close()
    super().__init__(self._make_order(start_step))
    self.start_step = start_step

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {**self._parent.get_state(), ORDER_START_STEP: self.start_step}

  def set_state(self, state: dict[str, Any]) -> None:
    position = dict(state)
    start_step = position.pop(ORDER_START_STEP, 0)
    if start_step != self.start_step:
      self._use_order(start_step)
    self._parent.set_state(position)

  def restart_order(self, step: int) -> None:
    """Goes on with a fresh order seeded by `step` (`order_seed`).

    For a run resumed on another number of processes: each process read its
    own shard of the old order, so no position in it fits the new shards.
    """
    self._use_order(step)


def make_train_iterator(
  config: DataConfig,
  global_batch_size: int,
  shard_options: grain.sharding.ShardOptions | None = None,
) -> TrainIterator:
  """An endless iterator over this process's share of the training batches.

  Args:
    config: what to read and how to prepare it.
    global_batch_size: examples per step over all processes.
    shard_options: which share this process reads; by default
      `grain.sharding.ShardByJaxProcess(drop_remainder=True)`.

  Returns:
    A checkpointable iterator of `{"image": float32 [B, S, S, C] in [-1, 1],
    "label": int32 [B]}` with B = global_batch_size / process count,
    S = config.image_size and C = config.num_channels, in the order of
    `config.seed` (of `order_seed(config.seed, s)` after `restart_order(s)`).
  """
  shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  batch_size = local_batch_size(global_batch_size, shard_options.shard_count)
  # Threads prepare whole batches: prefetching single records would cost
  # grain a scan of its buffer per record.
  read_options = grain.ReadOptions(
    num_threads=config.num_threads,
    prefetch_buffer_size=2 * config.num_threads,
  )

  def make_order(start_step: int) -> grain.DatasetIterator:
    seed = order_seed(config.seed, start_step)
    records = _records(config, shard_options, seed)
    batches = records.batch(batch_size, drop_remainder=True)
    return iter(batches.to_iter_dataset(read_options).map(transforms.to_model_range))

  return TrainIterator(make_order)


def make_eval_iterator(
  config: DataConfig,
  global_batch_size: int,
  shard_options: grain.sharding.ShardOptions | None = None,
  num_examples: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """A finite pass over every example of `config.split` exactly once, in order.

  For reference statistics and likelihoods, never for training: no shuffle,
  no flips, no repeat, no dropped remainder. Each process reads a contiguous
  shard; the last batches are padded with zero images whose `mask` is False,
  and every process yields the same number of batches (so that jitted,
  sharded computations see the same shapes on all hosts).

  Args:
    config: what to read; `shuffle` and `random_flip` are ignored.
    global_batch_size: examples per batch over all processes.
    shard_options: this process's share; by default
      `grain.sharding.ShardByJaxProcess(drop_remainder=False)`.
    num_examples: read only the split's first `num_examples`; 0 = all.

  Yields:
    `{"image": float32 [B, S, S, C] in [-1, 1], "label": int32 [B],
    "mask": bool [B], "index": int32 [B]}` with B = global_batch_size /
    process count; `index` is each example's position in the split (-1 for
    padding), the same whatever the number of processes.
  """
  shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=False)
  batch_size = local_batch_size(global_batch_size, shard_options.shard_count)
  source = grain.MapDataset.source(make_source(config))
  if num_examples:
    source = source[:num_examples]
  # Every shard has at most ceil(len / count) examples: all processes agree.
  num_batches = math.ceil(math.ceil(len(source) / shard_options.shard_count) / batch_size)
  this_shard = grain.sharding.ShardOptions(
    shard_options.shard_index, shard_options.shard_count, drop_remainder=False
  )
  positions = shard(grain.MapDataset.range(len(source)), this_shard)
  first = positions[0] if len(positions) else len(source)
  records = shard(source, this_shard).map(
    transforms.Preprocess(config.image_size, config.num_channels)
  )
  batches = iter(
    records.batch(batch_size, drop_remainder=False).to_iter_dataset(
      grain.ReadOptions(
        num_threads=config.num_threads,
        prefetch_buffer_size=2 * config.num_threads,
      )
    )
  )
  shape = (batch_size, config.image_size, config.image_size, config.num_channels)
  for b in range(num_batches):
    batch = next(batches, None)
    mask = np.arange(batch_size) < (0 if batch is None else len(batch["image"]))
    index = first + b * batch_size + np.arange(batch_size, dtype=np.int32)
    yield transforms.to_model_range(_pad_batch(batch, shape)) | {
      "mask": mask,
      "index": np.where(mask, index, -1).astype(np.int32),
    }


def _pad_batch(batch, shape) -> dict[str, np.ndarray]:
  """A uint8 batch (or None) zero-padded to `shape` [B, S, S, C]."""
  padded = {"image": np.zeros(shape, np.uint8), "label": np.zeros(shape[:1], np.int32)}
  if batch is not None:
    count = len(batch["image"])
    padded["image"][:count] = batch["image"]
    padded["label"][:count] = batch["label"]
  return padded


def num_examples(config: DataConfig) -> int:
  """The number of examples in the whole dataset (all processes together)."""
  return len(make_source(config))


def make_global_batch(local_batch, sharding: jax.sharding.Sharding):
  """Joins every process's local batch into global arrays.

  Args:
    local_batch: a pytree of numpy arrays [B_local, ...], e.g. one batch of
      `make_train_iterator`.
    sharding: the sharding of the global batch, typically
      `NamedSharding(mesh, PartitionSpec("data"))`.

  Returns:
    The same pytree of `jax.Array`s [B_local * process count, ...], each
    process's rows placed on its own devices.
  """
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x),
    local_batch,
  )
