"""Negative log-likelihood in bits/dim on a dataset split, sharded over the mesh, resumable.

The full variational bound (Ho et al. 2020 eq. 5) of every example,
`losses.nll_bpd`: one compiled loop over all T steps per batch, the batch
split over the devices of every host. The per-example parts of each finished
batch are saved, so an interrupted evaluation continues where it stopped.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from diffusion_jax import files, losses, parallel
from diffusion_jax.evaluation.config import NllConfig
from diffusion_jax.train.inference import EmaModel

PARTS = ("bpd", "prior_bpd", "decoder_bpd", "terms_bpd")


def make_nll_fn(model: EmaModel, clip_x0: bool):
  """A pure `(params, images [B, H, W, C], labels [B], key) -> {part: [B]}` of the bound's parts.

  bpd = prior (L_T) + decoder (L_0) + terms (the sum of L_1 .. L_{T-1}), in bits/dim.
  """
  def nll_fn(params, images, labels, key):
    y = None if model.num_classes is None else labels
    model_fn = lambda x_t, t: model.apply_fn(params, x_t, t, y)
    result = losses.nll_bpd(model_fn, model.spec, model.schedule, images, key, clip_x0=clip_x0)
    return dict(zip(PARTS, (result.total_bpd, result.prior_bpd, result.vb[:, 0],
                            jnp.sum(result.vb[:, 1:], axis=1))))

  return nll_fn


def evaluate_nll(model: EmaModel, batches, config: NllConfig, out_dir: str, *,
                 key: jax.Array, num_batches: int | None = None) -> dict:
  """Mean NLL parts (bits/dim) over the masked examples of `batches`; resumes from `out_dir`.

  Args:
    model: the EMA parameters and what they need; params replicated over all devices.
    batches: an iterator of this process's `{"image", "label", "mask"}` batches
      (`data.make_eval_iterator`), the same number on every process.
    config: the NLL settings; `num_examples` > 0 keeps each process's first
      num_examples / process count examples.
    out_dir: where each finished batch's per-example parts are saved; name it
      after every setting that changes them, so that a rerun resumes only its own.
    key: batch b draws its noise with fold_in(key, b).
    num_batches: the iterator's length, for the progress bar.

  Returns:
    {"bpd", "prior_bpd", "decoder_bpd", "terms_bpd": mean over examples,
    "num_examples", "clip_x0"}.
  """
  mesh = parallel.make_mesh()
  batch_sharding = parallel.batch_sharding(mesh)
  nll_fn = jax.jit(make_nll_fn(model, config.clip_x0), out_shardings=batch_sharding,
                   compiler_options=parallel.compiler_options(mesh))
  limit = -(-config.num_examples // jax.process_count()) if config.num_examples else np.inf
  os.makedirs(out_dir, exist_ok=True)
  parts, seen = [], 0
  for b, batch in enumerate(tqdm.tqdm(batches, total=num_batches, desc="nll", unit="batch")):
    if seen >= limit:  # every process stops at the same batch: equal local sizes and limits
      break
    mask = batch["mask"] & (seen + np.arange(len(batch["mask"])) < limit)
    seen += len(mask)
    path = os.path.join(out_dir, f"batch_{b:06d}.npz")
    if not os.path.exists(path):
      inputs = [jax.make_array_from_process_local_data(batch_sharding, batch[k])
                for k in ("image", "label")]
      result = multihost_utils.process_allgather(
          nll_fn(model.params, *inputs, jax.random.fold_in(key, b)), tiled=True)
      mask_all = multihost_utils.process_allgather(mask, tiled=True)
      if jax.process_index() == 0:
        files.save_npz(path, **result, mask=mask_all)
      multihost_utils.sync_global_devices(f"nll batch {b}")
    with np.load(path) as saved:
      parts.append({k: saved[k][saved["mask"]] for k in PARTS})
  means = {k: float(np.mean(np.concatenate([p[k] for p in parts]))) for k in PARTS}
  return {**means, "num_examples": int(sum(len(p["bpd"]) for p in parts)),
          "clip_x0": config.clip_x0}

