"""An evaluation protocol end to end: samples, features, reference statistics, metrics, NLL.

    report = evaluation.evaluate(config, workdir)   # config: an EvalConfig

Everything that can be wrong with the inputs (weights, reference file,
samples file, checkpoint, data) is checked before anything is written. The
long phases resume: sample batches, NLL batches and reference statistics are
saved as they finish, and a rerun of the same evaluation reuses them.

Several processes (a `jax.distributed` job, as `launch.evaluate` starts on a
pod) call `evaluate` together: every batch of samples, features and NLL is
split over the devices of all of them, the statistics are merged exactly
(`features.summarize`), and process 0 alone writes files; every process
returns the same report. Files are read and written through `files`, so
WORKDIR may be gs://.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time

import jax
import numpy as np
from absl import logging

from diffusion_jax import checkpoint, data, files, images, outputs, sampling
from diffusion_jax.config.evaluation import LIKELIHOOD_METRICS, EvalConfig, NllConfig, NllOdeConfig
from diffusion_jax.evaluation import features as feature_lib
from diffusion_jax.evaluation import hosts, nll, nll_ode, reference, report as report_lib
from diffusion_jax.evaluation import scores
from diffusion_jax.runs import EmaModel, draw_samples, load_ema_for_sampling

# Below this many images a 2048-dim covariance is singular (Heusel et al. use 50,000).
MIN_FID_IMAGES = 2048


class _PhaseTimer:
  """Wall time per phase, for the report."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, phase: str):
    start = time.perf_counter()
    yield
    self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - start, 3)


def evaluate(
  config: EvalConfig,
  workdir: str,
  *,
  samples_path: str | None = None,
  reference_path: str | None = None,
  trust_model_code: bool = False,
  overwrite: bool = False,
) -> dict:
  """Runs `config` on the run in `workdir` (or on `samples_path`); writes and returns the report.

  The report goes to WORKDIR/eval/<name>-step<N>/report.json (or
  <name>-<samples file name>/ for a samples file), with TensorBoard scalars and,
  for a sweep over several samplers, fid_vs_nfe.png beside it; a samples or
  reference file inside that folder is refused. The folder is claimed with
  the evaluation's settings (`outputs.claim`): a rerun with the same settings
  resumes there; files of another evaluation, or files no evaluation wrote,
  are refused unless `overwrite`. A model factory named in the workdir's
  config.json is imported only with `trust_model_code`.
  """
  timer = _PhaseTimer()
  with timer("load"):
    samples = load_samples(samples_path) if samples_path else None
    nets = {name: feature_lib.LOADERS[name](config) for name in _networks(config)}
    given_reference = _given_reference(reference_path or config.reference_path, nets, config)
    model, skipped = _load_model(
      config, workdir, need_samples=samples is None, trust_model_code=trust_model_code
    )
    data_config = _data_config(config, model)
    _check_splits_readable(config, data_config, given_reference, model)
  if samples is not None:
    _check_samples_fit(samples, samples_path, nets, data_config)
  step_tag = f"step{model.step}" if samples is None else _file_tag(samples_path)
  out_dir = files.join(workdir, "eval", f"{config.name}-{step_tag}")
  outputs.check_apart(
    out_dir, [samples_path, reference_path or config.reference_path], what="evaluation folder"
  )
  _claim(
    out_dir,
    {
      "config": dataclasses.asdict(config),
      "samples": samples_path,
      "reference": reference_path,
      "checkpoint_step": None if model is None else model.step,
    },
    overwrite,
  )

  with timer("reference"):
    references = {
      name: given_reference
      if given_reference and name == "inception"
      else reference_statistics(net, config, data_config, workdir)
      for name, net in nets.items()
    }
  runs = []
  for sampler, seed in _draws(config, samples is None):
    with timer("sampling"):
      run_samples = (
        samples if sampler is None else _draw(model, sampler, config, out_dir, seed, overwrite)
      )
    with timer("features"):
      scores = score_samples(run_samples, nets, references, config)
    runs.append(
      {
        **_describe(sampler, model, samples_path),
        "num_samples": len(run_samples),
        **({"seed": seed} if config.seeds else {}),
        **scores,
      }
    )
  report = {
    "config": config.name,
    "workdir": workdir,
    "checkpoint_step": None if model is None else model.step,
    "runs": runs,
    "skipped": skipped,
    **report_lib.over_seeds(runs),
    "feature_networks": {name: net.info for name, net in nets.items()},
    "references": {name: _reference_info(ref) for name, ref in references.items()},
  }
  if config.real_floor and nets:
    with timer("real_floor"):
      report["real_floor"] = _real_floor(nets, references, config, data_config)
  if "nll" in config.metrics and model is not None:
    with timer("nll"):
      report["nll"] = _nll(model, config, data_config, out_dir)
  if "nll_ode" in config.metrics and model is not None:
    with timer("nll_ode"):
      report["nll_ode"] = _nll_ode(model, config, data_config, out_dir)
  report["warnings"] = _warnings(config, runs)
  report["seconds"] = timer.seconds
  report_lib.write(report, out_dir, step=0 if model is None else model.step)
  return report


# ----------------------------------------------------------------------------- inputs


def load_samples(path: str) -> np.ndarray:
  """The `arr_0` of a samples .npz (the ADM evaluator's format): uint8 [N, H, W, 1 or 3]."""
  arrays = reference.read_npz(path, "samples file")
  if "arr_0" not in arrays:
    raise ValueError(f"Samples file {path} has no 'arr_0' array; it has {sorted(arrays)}.")
  samples = arrays["arr_0"]
  if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[-1] not in (1, 3):
    raise ValueError(
      f"Samples file {path}: 'arr_0' must be uint8 [N, H, W, 1 or 3] images,"
      f" got {samples.dtype} {samples.shape}."
    )
  return samples


def _networks(config: EvalConfig) -> list[str]:
  """The feature networks the config's metrics run on, in a fixed order."""
  return sorted({scores.network(m) for m in config.sample_metrics})


def _given_reference(path: str, nets: dict, config: EvalConfig):
  """A precomputed Inception reference file, checked against the network's feature sizes."""
  if not path:
    return None
  if "inception" not in nets:
    raise ValueError(f"A reference file ({path}) is for Inception metrics; {config.name} has none.")
  stats = reference.load_reference(path)
  net = nets["inception"]
  used = [scores.METRICS[m] for m in config.sample_metrics]
  reference.check_dimension(
    stats, net.pool_dim, net.spatial_dim if any(m.uses_spatial for m in used) else None
  )
  if any(m.keeps_pool for m in used) and stats.features is None and stats.images is None:
    raise ValueError(
      f"Reference {path} has neither pool features nor images (arr_0):"
      " precision/recall needs one of them."
    )
  return stats


def _load_model(config: EvalConfig, workdir: str, need_samples: bool, trust_model_code: bool):
  """(the EMA model or None, skipped metrics): samples need it; so does NLL, if it can be had."""
  has_run = files.exists(files.join(workdir, checkpoint.CONFIG_FILE))
  if not need_samples and not has_run:
    return None, {
      m: f"no training run in {workdir}" for m in LIKELIHOOD_METRICS if m in config.metrics
    }
  step = None if config.checkpoint_step < 0 else config.checkpoint_step
  model = load_ema_for_sampling(workdir, step, trust_model_code=trust_model_code)
  if "nll_ode" in config.metrics:
    nll_ode.check_model(model)
  return model, {}


def _data_config(config: EvalConfig, model: EmaModel | None):
  """The evaluation data (reference and NLL splits), checked against the model's image shape."""
  if not config.data:
    raise ValueError(
      f"Eval config {config.name!r} names no data (config.data): set its source,"
      " name, image_size and num_channels."
    )
  data_config = data.DataConfig.from_mapping(
    {**config.data, "shuffle": False, "random_flip": False}
  )
  shape = (data_config.image_size, data_config.image_size, data_config.num_channels)
  if model is not None and shape != model.image_shape:
    raise ValueError(
      f"Eval data images are {shape} but the model makes {model.image_shape}:"
      " set config.data.image_size / num_channels to the run's."
    )
  return data_config


def _check_splits_readable(config: EvalConfig, data_config, given_reference, model) -> None:
  """Opens every split the evaluation reads, so a missing dataset fails before anything is written."""
  splits = set()
  if config.sample_metrics and not (given_reference and _networks(config) == ["inception"]):
    splits.add(config.reference_split)
  if ("nll" in config.metrics and model is not None) or config.real_floor:
    splits.add(config.nll.split)
  if "nll_ode" in config.metrics and model is not None:
    splits.add(config.nll_ode.split)
  for split in sorted(splits):
    data.num_examples(dataclasses.replace(data_config, split=split))


def _check_samples_fit(samples: np.ndarray, path: str, nets: dict, data_config) -> None:
  shape = (data_config.image_size, data_config.image_size, data_config.num_channels)
  if "digits_classifier" in nets and samples.shape[1:] != shape:
    raise ValueError(
      f"Samples file {path} holds {samples.shape[1:]} images; the digits metrics need {shape}."
    )


def _claim(out_dir: str, settings: dict, overwrite: bool) -> None:
  """`outputs.claim` of OUT_DIR by process 0, whatever it holds counted as another's files.

  Every process raises the same refusal, before any of them starts working.
  """
  refusal = None
  if jax.process_index() == 0:
    found = (
      [files.join(out_dir, name) for name in files.listdir(out_dir)]
      if files.exists(out_dir)
      else []
    )
    try:
      outputs.claim(out_dir, settings, found, overwrite=overwrite)
    except outputs.OutputConflictError as error:
      refusal = error
  if hosts.process_0_says(refusal is not None):
    raise refusal or outputs.OutputConflictError(
      f"Process 0 refused the evaluation folder {out_dir} (see process 0's error)."
    )


def _file_tag(path: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(path))[0])


# ----------------------------------------------------------------------------- reference


def _split_batches(data_config, split: str, global_batch_size: int):
  """This process's share of every example of `split` once: uint8 batches for `summarize`."""
  split_config = dataclasses.replace(data_config, split=split)
  for batch in data.make_eval_iterator(split_config, global_batch_size):
    yield {"image": images.to_uint8(batch["image"]), "mask": batch["mask"], "index": batch["index"]}


def _summarize_split(net, data_config, split: str, **kwargs) -> feature_lib.FeatureSummary:
  """`feature_lib.summarize` of every example of `split`, its batch split over all processes."""
  total = data.num_examples(dataclasses.replace(data_config, split=split))
  return feature_lib.summarize(
    net, _split_batches(data_config, split, net.global_batch_size(total)), total=total, **kwargs
  )


def reference_statistics(
  net, config: EvalConfig, data_config, workdir: str
) -> reference.ReferenceStats:
  """The reference split's statistics under `net`: cached in WORKDIR/eval/, else computed.

  Call it on every process: each computes the features of its share of the
  split, and process 0 writes the cache file; when process 0 finds the file,
  every process reads it (the workdir is shared, e.g. a bucket).
  """
  tag = _file_tag(
    f"{data_config.source}-{data_config.name}-{data_config.image_size}px"
    f"x{data_config.num_channels}-{config.reference_split}"
  )
  if net.name == "inception":
    tag += f"-{config.resize}-{net.info['sha256'][:12]}"
  path = files.join(workdir, "eval", f"reference-{net.name}-{tag}.npz")
  keep_pool = net.name == "inception" and any(
    scores.METRICS[m].keeps_pool for m in config.sample_metrics
  )
  if hosts.process_0_says(jax.process_index() == 0 and files.exists(path)):
    stats = reference.load_reference(path)
    if stats.features is not None or not keep_pool:
      return stats
  summary = _summarize_split(
    net,
    data_config,
    config.reference_split,
    keep_pool=keep_pool,
    desc=f"reference {config.reference_split}",
  )
  stats = reference.ReferenceStats.from_accumulators(
    summary.pool,
    summary.spatial,
    features=None if summary.pool_features is None else summary.pool_features[: config.num_samples],
    source={
      "data": dataclasses.asdict(data_config) | {"split": config.reference_split},
      **net.info,
    },
  )
  if jax.process_index() == 0:
    reference.save_reference(path, stats)
  return dataclasses.replace(stats, path=path)


def _reference_info(stats: reference.ReferenceStats) -> dict:
  return {
    "path": stats.path,
    "num_images": stats.num_images,
    "source": json.loads(json.dumps(dict(stats.source), default=str)),
  }


# ----------------------------------------------------------------------------- samples


def _draws(config: EvalConfig, drawing: bool) -> list[tuple[sampling.SamplerConfig | None, int]]:
  """(sampler, seed) of every draw: each setting with each of `seeds` (or `seed`); (None, seed)
  when the samples are given, not drawn."""
  if not drawing:
    return [(None, config.seed)]
  return [(sampler, seed) for sampler in config.samplers for seed in config.seeds or (config.seed,)]


def _draw(
  model: EmaModel,
  sampler: sampling.SamplerConfig,
  config: EvalConfig,
  out_dir: str,
  seed: int,
  overwrite: bool,
) -> np.ndarray:
  """config.num_samples images from one sampler setting, through the resumable sample_to_files."""
  batch_size = -(-config.batch_size // jax.device_count()) * jax.device_count()
  name = f"samples-{sampler.label}-seed{seed}"
  return draw_samples(
    model,
    sampler,
    config.num_samples,
    batch_size,
    files.join(out_dir, name),
    seed=seed,
    overwrite=overwrite,
  )


def _describe(sampler, model: EmaModel | None, samples_path: str | None) -> dict:
  """The sampler's settings and its NFE (network evaluations per image; x2 under guidance)."""
  if sampler is None:
    return {"samples_file": samples_path}
  num_timesteps = model.schedule.num_timesteps
  return {
    "sampler": sampler.sampler,
    "steps": sampler.num_steps(num_timesteps),
    "eta": sampler.eta,
    "guidance": sampler.guidance_scale,
    "options": sampler.options,
    "nfe": sampler.nfe(num_timesteps),
  }


def score_samples(samples: np.ndarray, nets: dict, references: dict, config: EvalConfig) -> dict:
  """Every sample metric of `config` on uint8 samples [N, H, W, C], held by every process.

  Call it on every process: each computes the features of its share.
  """
  found = {}
  for name, net in nets.items():
    summary = feature_lib.summarize(
      net,
      feature_lib.local_batches(samples, net.global_batch_size(len(samples))),
      **_kept(config, name),
      total=len(samples),
      desc=f"{net.name} features",
    )
    found.update(_metrics_of(summary, references[name], net, config))
  return found


def _on(config: EvalConfig, network: str) -> list[str]:
  """The sample metrics of `config` that run on `network`."""
  return [m for m in config.sample_metrics if scores.network(m) == network]


def _kept(config: EvalConfig, network: str) -> dict[str, bool]:
  """What `summarize` must keep of an image set for the metrics of `config` that use `network`."""
  on = [scores.METRICS[m] for m in _on(config, network)]
  return {
    "keep_logits": any(m.keeps_logits for m in on),
    "keep_pool": any(m.keeps_pool for m in on),
  }


def _metrics_of(
  summary: feature_lib.FeatureSummary, ref: reference.ReferenceStats, net, config: EvalConfig
) -> dict:
  """The config's metrics that run on `net`, from one image set's summary."""
  found = {}
  for metric in _on(config, net.name):
    found.update(scores.METRICS[metric].compute(summary, ref, net, config, metric))
  return found


# ----------------------------------------------------------------------------- floor, NLL


def _real_floor(nets: dict, references: dict, config: EvalConfig, data_config) -> dict:
  """The sample metrics of the NLL split's real images: how close real held-out data gets."""
  floor = {"split": config.nll.split}
  for name, net in nets.items():
    summary = _summarize_split(
      net, data_config, config.nll.split, **_kept(config, name), desc=f"real {config.nll.split}"
    )
    floor.update(_metrics_of(summary, references[name], net, config), num_images=summary.count)
  return floor


def _likelihood_split(
  data_config: data.DataConfig, section: NllConfig | NllOdeConfig
) -> tuple[data.DataConfig, int]:
  """(`section.split`'s data config, the batches each process reads of it).

  `section` (config.nll or config.nll_ode) names the split, its batch size and
  how many of its examples count (0: all).
  """
  split_config = dataclasses.replace(data_config, split=section.split)
  total = data.num_examples(split_config)
  if section.num_examples:
    total = min(total, section.num_examples)
  return split_config, -(-total // (section.batch_size * jax.process_count()))


def _nll(model: EmaModel, config: EvalConfig, data_config, out_dir: str) -> dict:
  """NLL in bits/dim on config.nll.split, resumable in OUT_DIR/nll-<settings>/."""
  nll_config = config.nll
  split_config, num_batches = _likelihood_split(data_config, nll_config)
  batch_size = nll_config.batch_size
  name = (
    f"nll-{_file_tag(nll_config.split)}-n{nll_config.num_examples}-b{batch_size}"
    f"-clip{int(nll_config.clip_x0)}-seed{config.seed}"
  )
  batches = data.make_eval_iterator(split_config, batch_size, num_examples=nll_config.num_examples)
  result = nll.evaluate_nll(
    model,
    batches,
    nll_config,
    files.join(out_dir, name),
    key=jax.random.key(config.seed),
    num_batches=num_batches,
  )
  return {"split": nll_config.split, **result}


def _nll_ode(model: EmaModel, config: EvalConfig, data_config, out_dir: str) -> dict:
  """NLL in bits/dim through the probability-flow ODE on config.nll_ode.split, resumable."""
  ode_config = config.nll_ode
  split_config, num_batches = _likelihood_split(data_config, ode_config)
  settings = (
    f"{ode_config.solver}-r{ode_config.rtol:g}-a{ode_config.atol:g}"
    if ode_config.solver == "dopri5"
    else f"fixed{ode_config.steps}"
  )
  divergence = (
    "exact" if ode_config.divergence == "exact" else f"{ode_config.probe}{ode_config.probes}"
  )
  name = (
    f"nll_ode-{_file_tag(ode_config.split)}-n{ode_config.num_examples}"
    f"-b{ode_config.batch_size}-{settings}-{divergence}-{ode_config.dequantisation}"
    f"-t{ode_config.t_min:g}-seed{config.seed}"
  )
  make_batches = lambda: data.make_eval_iterator(
    split_config, ode_config.batch_size, num_examples=ode_config.num_examples
  )
  result = nll_ode.evaluate_nll_ode(
    model,
    make_batches,
    ode_config,
    files.join(out_dir, name),
    key=jax.random.key(config.seed),
    num_batches=num_batches,
  )
  return {"split": ode_config.split, **result}


def _warnings(config: EvalConfig, runs: list[dict]) -> list[str]:
  warnings = []
  for run in runs:
    if "fid" in run and run["num_samples"] < MIN_FID_IMAGES:
      warnings.append(
        f"FID from {run['num_samples']} < {MIN_FID_IMAGES} samples: the 2048-dim"
        " covariance is singular and the FID biased upwards; not comparable with"
        " published 50k-sample numbers."
      )
  for message in warnings:
    logging.warning(message)
  return warnings
