"""From a trained model to image files: batched, one key per batch, resumable."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from diffusion_jax import files, outputs
from diffusion_jax import images as image_utils
from diffusion_jax.config.sampler import SamplerConfig
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.sampling import denoisers, edm_sampler
from diffusion_jax.sampling.guidance import classifier_free_guidance
from diffusion_jax.sampling.loop import logsnr_respaced, respaced
from diffusion_jax.sampling.samplers import get_sampler
from diffusion_jax.schedules import Schedule

# apply_fn(params, x_t [B, H, W, C], t int32 [B], y int32 [B] or None) -> output
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]
GRID_IMAGES = 64
GRID_MIN_SIZE = 32  # pixels: smaller samples are enlarged in grid.png
_RESULT_FILES = ("samples.npz", "grid.png")  # written once every batch is drawn


def make_batch_sampler(
  config: SamplerConfig,
  apply_fn: ApplyFn,
  spec: ModelSpec,
  schedule: Schedule,
  image_shape,
  batch_size: int,
  *,
  num_classes: int | None = None,
  labels=None,
):
  """A pure `sample_batch(params, key) -> float32 [batch_size, H, W, C]` in [-1, 1].

  `config.steps` are spaced uniformly in time for "ddpm" and "ddim", for
  "dpm_solver" in log-SNR (`logsnr_respaced`) from 15 steps and in time below
  (its `spacing`: each the better one on the digits), and
  by EDM's eq. 5 in sigma for "edm_heun" (rounded to the timesteps of
  `schedule` for a discrete-time model: `denoisers.from_discrete`). An
  EDM-preconditioned model (spec.edm) runs "edm_heun" on its own sigma, and the
  others as the x_0-model `denoisers.as_discrete_model` on `schedule`; a
  consistency model runs "consistency" (CM Algorithm 1, `config.steps` calls).
  A class-conditional model (num_classes set) gets `labels` (int [batch_size],
  e.g. `grid_labels`), or uniformly drawn ones when None, guided with label
  num_classes as the null class when guidance_scale > 0.
  """
  if config.guidance_scale and num_classes is None:
    raise ValueError("guidance_scale > 0 needs a class-conditional model (num_classes).")
  if labels is not None and (num_classes is None or np.shape(labels) != (batch_size,)):
    raise ValueError(
      f"labels must be int [batch_size={batch_size}] for a class-conditional"
      f" model, got shape {np.shape(labels)} with num_classes={num_classes}."
    )
  draw = _sampler_call(config, spec, schedule, (batch_size, *image_shape))

  def sample_batch(params, key):
    label_key, key = jax.random.split(key)
    if num_classes is None:
      model_fn = lambda x, t: apply_fn(params, x, t, None)
    else:
      classes = (
        jax.random.randint(label_key, (batch_size,), 0, num_classes)
        if labels is None
        else jnp.asarray(labels, jnp.int32)
      )
      model_fn = lambda x, t: apply_fn(params, x, t, classes)
      if config.guidance_scale:
        conditional = lambda x, t, y: apply_fn(params, x, t, y)
        model_fn = classifier_free_guidance(
          conditional, spec, classes, config.guidance_scale, null_label=num_classes
        )
    return draw(model_fn, key)

  return sample_batch


def _sampler_call(config: SamplerConfig, spec: ModelSpec, schedule: Schedule, shape):
  """`draw(model_fn, key) -> images`: the configured sampler on model_fn (the network's calls)."""
  if config.sampler == "edm_heun":
    churn = dict(
      s_churn=config.s_churn, s_tmin=config.s_tmin, s_tmax=config.s_tmax, s_noise=config.s_noise
    )
    as_denoiser = (
      (lambda model_fn: denoisers.from_edm(model_fn, spec))
      if spec.edm
      else (lambda model_fn: denoisers.from_discrete(model_fn, spec, schedule))
    )
    return lambda model_fn, key: edm_sampler.edm_sample(
      as_denoiser(model_fn), key, shape, num_steps=config.num_steps(schedule.num_timesteps), **churn
    )
  sampler = get_sampler(config.sampler)
  if config.sampler == "consistency":
    return lambda model_fn, key: sampler(
      model_fn, spec, schedule, key, shape, num_steps=config.num_steps(schedule.num_timesteps)
    )
  options = {"ddim": {"eta": config.eta}, "dpm_solver": {"order": config.order}}.get(
    config.sampler, {}
  )
  steps = (
    logsnr_respaced(schedule, config.steps)
    if config.steps and config.spaced_in_log_snr(schedule.num_timesteps)
    else respaced(schedule, config.steps)
  )
  if not spec.edm:
    return lambda model_fn, key: sampler(model_fn, spec, steps, key, shape, **options)

  def draw_edm_network(model_fn, key):
    x0_fn, x0_spec = denoisers.as_discrete_model(denoisers.from_edm(model_fn, spec), spec, schedule)
    return sampler(x0_fn, x0_spec, steps, key, shape, **options)

  return draw_edm_network


def grid_labels(num_images: int, num_classes: int) -> np.ndarray:
  """int32 [num_images]: class r % num_classes for every image of row r of an image grid.

  Rows as `images.make_image_grid` lays them out (ceil(sqrt(N)) columns), so a
  class-conditional grid of 100 images shows ten rows, one per class, for ten classes.
  """
  return (np.arange(num_images) // image_utils.grid_columns(num_images) % num_classes).astype(
    np.int32
  )


def sample_to_files(
  sample_batch_fn: Callable[[jax.Array], jax.Array],
  num_samples: int,
  batch_size: int,
  out_dir: str,
  *,
  key: jax.Array,
  settings: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> np.ndarray:
  """Draws `num_samples` images into `out_dir`, batch by batch; reruns resume.

  Batch b is `sample_batch_fn(fold_in(key, b))` (float [batch_size, H, W, C] in
  [-1, 1]), written as uint8 to batch_{b:06d}.npz as soon as it is made; the
  write is atomic, so an interrupted run keeps exactly its finished batches and
  a rerun draws only the rest, with the same keys: the result equals an
  uninterrupted run. `settings` (JSON-able, e.g. the sampler's flags) is saved
  with batch_size and key, and a rerun with different ones is refused. A
  folder without saved settings that already holds any of the files this
  writes is refused unless `overwrite` (they are not this run's).

  Several processes (a `jax.distributed` job) call it together, with a
  `sample_batch_fn` jitted over the devices of all of them, the batch split
  over its first axis (what `launch.sample` does): each device draws its rows
  of every batch, the batch is gathered, and only process 0 reads or writes
  `out_dir` (it decides which batches are left and sends that to the others).
  A batch depends on key, b and batch_size only, not on how many processes or
  devices draw it (JAX's partitionable threefry: each device makes its own
  slice of the same random numbers), so a run may be resumed by a different
  number of processes.

  Writes samples.npz ('arr_0': uint8 [num_samples, H, W, C], the format FID
  tools read) and grid.png of the first 64 images; returns the samples, on
  every process.
  """
  num_batches = math.ceil(num_samples / batch_size)
  paths = [files.join(out_dir, f"batch_{b:06d}.npz") for b in range(num_batches)]
  todo = _batches_to_draw(
    out_dir,
    paths,
    {
      **(settings or {}),
      "batch_size": batch_size,
      "key": np.asarray(jax.random.key_data(key)).tolist(),
    },
    overwrite,
  )
  drawn = {}
  for b in tqdm.tqdm(
    todo,
    total=num_batches,
    initial=num_batches - len(todo),
    desc="sampling",
    unit="batch",
    disable=jax.process_index() > 0,
  ):
    drawn[b] = image_utils.to_uint8(
      multihost_utils.process_allgather(sample_batch_fn(jax.random.fold_in(key, b)), tiled=True)
    )
    if drawn[b].shape[0] != batch_size:
      raise ValueError(
        f"sample_batch_fn returned {drawn[b].shape[0]} images (gathered over"
        f" {jax.process_count()} processes), expected {batch_size}."
      )
    if jax.process_index() == 0:
      files.save_npz(paths[b], arr_0=drawn[b])
  for b in range(num_batches):
    if b not in drawn:
      drawn[b] = _read_on_process_0(paths[b])
  samples = np.concatenate([drawn[b] for b in range(num_batches)])[:num_samples]
  if jax.process_index() == 0:
    samples_file, grid_file = (files.join(out_dir, name) for name in _RESULT_FILES)
    files.save_npz(samples_file, arr_0=samples)
    image_utils.save_image_grid(samples[:GRID_IMAGES], grid_file, min_size=GRID_MIN_SIZE)
  return samples


def _batches_to_draw(out_dir: str, paths: list[str], settings: dict, overwrite: bool) -> list[int]:
  """The indices of `paths` not yet written, as process 0 finds them after checking `settings`.

  Every process gets the same list, or the same refusal (a ValueError).
  """
  verdict = np.zeros(len(paths) + 1, np.int32)  # [missing batch b] + [folder refused]
  refusal = None
  if jax.process_index() == 0:
    try:
      resuming = outputs.claim(
        out_dir,
        settings,
        [*paths, *(files.join(out_dir, name) for name in _RESULT_FILES)],
        overwrite=overwrite,
      )
    except ValueError as error:
      refusal, resuming = error, False
    written = set(files.listdir(out_dir)) if resuming else set()
    verdict[:-1] = [files.path(path).name not in written for path in paths]
    verdict[-1] = refusal is not None
  verdict = multihost_utils.broadcast_one_to_all(verdict)
  if refusal:
    raise refusal
  if verdict[-1]:
    raise ValueError(f"Process 0 refused {out_dir} (see process 0's error).")
  return [b for b in range(len(paths)) if verdict[b]]


def _read_on_process_0(path: str) -> np.ndarray:
  """The uint8 [B, H, W, C] batch saved at `path`, read by process 0 and sent to every process."""
  batch = files.load_npz(path)["arr_0"] if jax.process_index() == 0 else None
  shape = multihost_utils.broadcast_one_to_all(
    np.array(batch.shape if batch is not None else (0, 0, 0, 0))
  )
  return multihost_utils.broadcast_one_to_all(
    batch if batch is not None else np.zeros(shape, np.uint8)
  )
