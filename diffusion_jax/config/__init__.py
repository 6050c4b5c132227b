"""Config schemas: the frozen dataclass sections of a run's config, importing no JAX.

  data          DataConfig: where the training images come from (the `data` section)
  optim         OptimConfig: the optimizer and its learning-rate schedule (`optim`)
  models        the settings of each architecture and zoo entry (`model`), JAX-free
  train         TrainConfig: the task-neutral loop (`train`)
  diffusion     DiffusionConfig (`diffusion`), DiffusionTrainConfig (`train`, diffusion's
                sample grids, periodic FID and label dropout), complete_config
  segmentation  the segmentation task's sections and its complete_config

A config file (configs/*.py) imports only these, so loading one imports
ml_collections and numpy, never JAX, Flax or TensorFlow. The rooms that build
a run from a config (the tasks, the run loader) read the sections back as
these dataclasses with `configlib.from_mapping`.
"""
