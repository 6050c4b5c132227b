"""The evaluation report: report.json, TensorBoard scalars, a table on stdout, FID vs NFE."""

from __future__ import annotations

import os

import jax
import numpy as np

from diffusion_jax import files, summaries

# Per-run keys that are settings, not scores.
_SETTINGS = (
  "sampler",
  "steps",
  "eta",
  "guidance",
  "options",
  "nfe",
  "num_samples",
  "samples_file",
  "seed",
)


def setting_name(run: dict) -> str:
  """'ddim-50steps' (plus eta and guidance when set), or the samples file."""
  if "sampler" not in run:
    return os.path.basename(run["samples_file"])
  name = f"{run['sampler']}-{run['steps']}steps"
  if run.get("options"):
    name += "-" + run["options"].replace(" ", "-")
  if run["eta"]:
    name += f"-eta{run['eta']:g}"
  return name + (f"-w{run['guidance']:g}" if run["guidance"] else "")


def run_name(run: dict) -> str:
  """setting_name, and '-seed<s>' for a run of an evaluation over several seeds."""
  return setting_name(run) + (f"-seed{run['seed']}" if "seed" in run else "")


def scores(run: dict) -> dict[str, float]:
  return {k: v for k, v in run.items() if k not in _SETTINGS}


def over_seeds(runs: list[dict]) -> dict:
  """{"over_seeds": [per setting: its settings, "seeds", "min" and "mean" of each score]}, for
  runs of several seeds (EDM reports the minimum FID of three); {} for runs without seeds."""
  settings = {setting_name(run): run for run in runs if "seed" in run}
  if not settings:
    return {}
  summaries = []
  for name, first in settings.items():
    same = [run for run in runs if setting_name(run) == name]
    values = {metric: [run[metric] for run in same] for metric in scores(first)}
    summaries.append(
      {
        **{k: v for k, v in first.items() if k in _SETTINGS and k != "seed"},
        "seeds": [run["seed"] for run in same],
        "min": {metric: float(np.min(v)) for metric, v in values.items()},
        "mean": {metric: float(np.mean(v)) for metric, v in values.items()},
      }
    )
  return {"over_seeds": summaries}


def write(report: dict, out_dir: str, step: int) -> None:
  """Writes report.json (atomically), TensorBoard scalars at `step`, the table, and the figure."""
  if jax.process_index() != 0:
    return
  files.write_json(files.join(out_dir, "report.json"), report, indent=2, sort_keys=True)
  scalars = {f"{run_name(run)}/{k}": v for run in report["runs"] for k, v in scores(run).items()}
  scalars.update(
    {
      f"{setting_name(summary)}/{statistic}_{k}": v
      for summary in report.get("over_seeds", ())
      for statistic in ("min", "mean")
      for k, v in summary[statistic].items()
    }
  )
  for section in ("nll", "nll_ode", "real_floor"):
    scalars.update(
      {f"{section}/{k}": v for k, v in report.get(section, {}).items() if isinstance(v, float)}
    )
  with summaries.EventWriter(out_dir) as writer:
    writer.write_scalars(step, scalars)
  print(format_table(report))
  curve = (
    [{**summary, **summary["mean"]} for summary in report["over_seeds"]]
    if "over_seeds" in report
    else report["runs"]
  )
  if len(curve) > 1:
    plot_fid_vs_nfe(curve, files.join(out_dir, "fid_vs_nfe.png"))


def format_table(report: dict) -> str:
  """The report as plain-text tables: one row per sampler setting, then the floor and NLL."""
  runs = report["runs"]
  names = sorted({k for run in runs for k in scores(run)})
  lines = [
    f"Evaluation {report['config']} of checkpoint step {report['checkpoint_step']}:",
    _row(["samples", "NFE", "N", *names]),
  ]
  for run in runs:
    lines.append(
      _row(
        [run_name(run), run.get("nfe", "-"), run["num_samples"], *[run.get(k, "-") for k in names]]
      )
    )
  for summary in report.get("over_seeds", ()):
    for statistic in ("min", "mean"):
      lines.append(
        _row(
          [
            f"{setting_name(summary)} {statistic} over seeds {summary['seeds']}",
            summary.get("nfe", "-"),
            summary["num_samples"],
            *[summary[statistic].get(k, "-") for k in names],
          ]
        )
      )
  if "real_floor" in report:
    floor = report["real_floor"]
    lines.append(
      _row(
        [f"real {floor['split']}", "-", floor["num_images"], *[floor.get(k, "-") for k in names]]
      )
    )
  if "nll" in report:
    nll = report["nll"]
    lines.append(
      f"NLL on {nll['split']} ({nll['num_examples']} images, clip_x0="
      f"{nll['clip_x0']}): {nll['bpd']:.4f} bits/dim = prior {nll['prior_bpd']:.4f}"
      f" + decoder {nll['decoder_bpd']:.4f} + terms {nll['terms_bpd']:.4f}"
    )
  if "nll_ode" in report:
    ode = report["nll_ode"]
    lines.append(
      f"NLL (probability-flow ODE) on {ode['split']} ({ode['num_examples']} images,"
      f" {ode['repeats']} repeat(s), {ode['dequantisation']} dequantisation):"
      f" {ode['bpd']:.4f} bits/dim, {ode['nfe']:.0f} NFE per image"
    )
  lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
  return "\n".join(lines)


def _row(cells) -> str:
  return " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells)


def plot_fid_vs_nfe(runs: list[dict], path: str) -> None:
  """The first Fréchet distance of each run against its NFE, one line per sampler and options."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  metric = next((k for k in ("fid", "fd_digits", "sfid") if k in runs[0]), None)
  if metric is None:
    return
  figure, axes = pyplot.subplots(figsize=(5, 3.5))
  line = lambda run: " ".join(filter(None, (run["sampler"], run.get("options"))))
  for name in sorted({line(run) for run in runs}):
    points = sorted((run["nfe"], run[metric]) for run in runs if line(run) == name)
    axes.plot(*zip(*points), marker="o", label=name)
  axes.set(xscale="log", xlabel="NFE (network evaluations per image)", ylabel=metric)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)
