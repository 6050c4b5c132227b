"""Input pipelines: TFDS, image folders and in-memory arrays, sharded by host.
Typical use:

    config = DataConfig.from_mapping(cfg.data)
    iterator = make_train_iterator(config, global_batch_size=128)
    batch = make_global_batch(next(iterator), batch_sharding)
"""

from diffusion_jax.config.data import SOURCES, DataConfig
from diffusion_jax.data.pipeline import (
  TrainIterator,
  local_batch_size,
  make_eval_iterator,
  make_global_batch,
  make_train_iterator,
  num_examples,
)
from diffusion_jax.data.sources import DatasetUnavailableError

__all__ = [
  "SOURCES",
  "DataConfig",
  "DatasetUnavailableError",
  "TrainIterator",
  "local_batch_size",
  "make_eval_iterator",
  "make_global_batch",
  "make_train_iterator",
  "num_examples",
]
