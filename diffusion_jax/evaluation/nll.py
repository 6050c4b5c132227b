"""Negative log-likelihood in bits/dim on a dataset split, sharded over the mesh, resumable.

The full variational bound (Ho et al. 2020 eq. 5) of every example,
`losses.nll_bpd`: one compiled loop over all T steps per batch, the batch
split over the devices of every process. Example i draws its noise from
fold_in(key, i), i its position in the split, so its bound does not depend on
the batch size or on how many processes share the split. Process 0 saves the
per-example parts of each finished batch, so an interrupted evaluation
continues where it stopped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from diffusion_jax import data, files, losses, parallel
from diffusion_jax.evaluation import hosts
from diffusion_jax.config.evaluation import NllConfig
from diffusion_jax.runs import EmaModel

PARTS = ("bpd", "prior_bpd", "decoder_bpd", "terms_bpd")


def make_nll_fn(model: EmaModel, clip_x0: bool):
  """A pure `(params, images [B, H, W, C], labels [B], index [B], key) -> {part: [B]}`.

  The bound's parts in bits/dim: bpd = prior (L_T) + decoder (L_0) + terms
  (the sum of L_1 .. L_{T-1}); example b's noise comes from fold_in(key, index[b]).
  """

  def example_nll(params, image, label, key):
    y = None if model.num_classes is None else label[None]
    model_fn = lambda x_t, t: model.apply_fn(params, x_t, t, y)
    result = losses.nll_bpd(model_fn, model.spec, model.schedule, image[None], key, clip_x0=clip_x0)
    parts = (result.total_bpd, result.prior_bpd, result.vb[:, 0], jnp.sum(result.vb[:, 1:], axis=1))
    return dict(zip(PARTS, (part[0] for part in parts)))

  def nll_fn(params, images, labels, index, key):
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
    return jax.vmap(example_nll, (None, 0, 0, 0))(params, images, labels, keys)

  return nll_fn


def evaluate_nll(
  model: EmaModel,
  batches,
  config: NllConfig,
  out_dir: str,
  *,
  key: jax.Array,
  num_batches: int | None = None,
) -> dict:
  """Mean NLL parts (bits/dim) over the examples of `batches`; resumes from `out_dir`.

  Call it on every process together.

  Args:
    model: the EMA parameters and what they need; params replicated over all devices.
    batches: this process's `{"image", "label", "mask", "index"}` batches
      (`data.make_eval_iterator`, which also takes `config.num_examples`), the
      same number on every process.
    config: the NLL settings (clip_x0).
    out_dir: where process 0 saves each finished batch's per-example parts
      with their indices; name it after every setting that changes them. A
      rerun reuses a saved batch that holds exactly the examples its batch
      now has (a run on another number of processes recomputes the rest).
    key: example i draws its noise with fold_in(key, i).
    num_batches: the iterator's length, for the progress bar.

  Returns:
    {"bpd", "prior_bpd", "decoder_bpd", "terms_bpd": mean over examples,
    "num_examples", "clip_x0"}; the same on every process.
  """
  mesh = parallel.make_mesh()
  batch_sharding = parallel.batch_sharding(mesh)
  nll_fn = jax.jit(
    make_nll_fn(model, config.clip_x0),
    out_shardings=batch_sharding,
    compiler_options=parallel.compiler_options(mesh),
  )
  results = run_batches(
    lambda inputs: nll_fn(model.params, inputs["image"], inputs["label"], inputs["index"], key),
    batches,
    out_dir,
    batch_sharding,
    desc="nll",
    num_batches=num_batches,
  )
  return mean_parts(results, PARTS) | {"clip_x0": config.clip_x0}


def run_batches(
  batch_fn, batches, out_dir: str, batch_sharding, *, desc: str, num_batches: int | None = None
) -> list[dict[str, np.ndarray]]:
  """Every batch's per-example results, each computed once: saved by process 0, reused on a rerun.

  Call it on every process together. `batch_fn` maps a global batch
  `{"image", "label", "index"}` (index -1 for padding) to `{part: [B]}`; its
  results are gathered on every process, with "index". Batch b is saved as
  OUT_DIR/batch_<b>.npz and reused only if it holds exactly the examples its
  batch now has.
  """
  if jax.process_index() == 0:
    files.makedirs(out_dir)
  results = []
  for b, batch in enumerate(
    tqdm.tqdm(batches, total=num_batches, desc=desc, unit="batch", disable=jax.process_index() > 0)
  ):
    inputs = data.make_global_batch(
      {
        "image": batch["image"],
        "label": batch["label"],
        "index": np.where(batch["mask"], batch["index"], -1).astype(np.int32),
      },
      batch_sharding,
    )
    index = multihost_utils.process_allgather(inputs["index"], tiled=True)
    path = files.join(out_dir, f"batch_{b:06d}.npz")
    if _saved_on_process_0(path, index):
      result = files.load_npz(path)
    else:
      result = multihost_utils.process_allgather(batch_fn(inputs), tiled=True)
      result["index"] = index
      if jax.process_index() == 0:
        files.save_npz(path, **result)
    results.append(result)
  return results


def _saved_on_process_0(path: str, index: np.ndarray) -> bool:
  """Whether process 0 finds at `path` a finished batch of exactly the examples `index`."""
  saved = False
  if jax.process_index() == 0 and files.exists(path):
    saved = np.array_equal(files.load_npz(path).get("index"), index)
  return hosts.process_0_says(saved)


def mean_parts(results: list[dict[str, np.ndarray]], parts) -> dict:
  """The mean of each part over the examples of every batch (index >= 0), summed in index order."""
  index = np.concatenate([r["index"] for r in results])
  examples = index >= 0
  order = np.argsort(index[examples])
  means = {
    k: float(np.mean(np.concatenate([r[k] for r in results])[examples][order])) for k in parts
  }
  return {**means, "num_examples": len(order)}
