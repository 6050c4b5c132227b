"""Sample quality against network calls (NFE) of several evaluated runs: one table and one figure.

    python -m launch.evaluate --config=configs/eval/digits.py:nfe --workdir=workdirs/digits
    python -m launch.evaluate --config=configs/eval/digits.py:nfe --workdir=workdirs/digits_edm
    python -m benchmarks.nfe_figure --output=docs/fid_vs_nfe.png \
        workdirs/digits/eval/digits-step1000/report.json \
        workdirs/digits_edm/eval/digits-step1000/report.json

Reads each `report.json` of `launch.evaluate`, prints a markdown table (one
row per NFE, one column per run and sampler setting) of the first Fréchet
distance the reports hold (fid or fd_digits), and draws every run's curves in
one figure: a line per sampler setting, solid for the first report, dashed for
the second, and so on; the real-data floor, where reported, as a grey line.
Reports joined by commas are one run (docs/distillation.md: a progressive
run's students, one report per checkpoint).
"""

import json

import matplotlib
from absl import app, flags

matplotlib.use("Agg")
from matplotlib import pyplot  # noqa: E402  (after choosing the backend)

_OUTPUT = flags.DEFINE_string("output", "fid_vs_nfe.png", "The figure's path (PNG).")
_LABELS = flags.DEFINE_list("labels", None, "A name per report; default its workdir's name.")
STYLES = ("-", "--", ":", "-.")


def _curves(report: dict, metric: str) -> dict[str, dict[int, float]]:
  """{sampler setting: {nfe: metric}} of one report."""
  curves = {}
  for run in report["runs"]:
    name = " ".join(filter(None, (run["sampler"], run.get("options"))))
    curves.setdefault(name, {})[run["nfe"]] = run[metric]
  return curves


def _metric(report: dict) -> str:
  run = report["runs"][0]
  return next(name for name in ("fid", "fd_digits", "sfid") if name in run)


def _table(curves: dict[str, dict[int, float]]) -> str:
  """A markdown table: one row per NFE, one column per curve ('-' where it has no point)."""
  names = sorted(curves)
  lines = ["| NFE | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
  for nfe in sorted({n for points in curves.values() for n in points}):
    cells = (f"{curves[name][nfe]:.1f}" if nfe in curves[name] else "-" for name in names)
    lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _read(argument: str) -> dict:
  """The report at `argument`, or several comma-separated ones as one: their runs together.

  A progressive distillation run is evaluated a checkpoint (a student) at a
  time, one report each; joined, its students make one curve.
  """
  reports = []
  for path in argument.split(","):
    with open(path) as f:
      reports.append(json.load(f))
  return {**reports[0], "runs": [run for report in reports for run in report["runs"]]}


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("Pass the report.json files to draw.")
  reports = [_read(argument) for argument in paths]
  labels = _LABELS.value or [report["workdir"].rstrip("/").rsplit("/", 1)[-1] for report in reports]
  if len(labels) != len(reports):
    raise app.UsageError(f"--labels has {len(labels)} names for {len(reports)} reports.")
  metric = _metric(reports[0])
  figure, axes = pyplot.subplots(figsize=(7, 4))
  every_curve = {}
  for report, label, style in zip(reports, labels, STYLES * len(reports)):
    for index, (name, points) in enumerate(sorted(_curves(report, metric).items())):
      every_curve[f"{label}: {name}"] = points
      axes.plot(
        *zip(*sorted(points.items())),
        style,
        marker="o",
        markersize=3,
        color=f"C{index}",
        label=f"{label}: {name}",
      )
    floor = report.get("real_floor", {}).get(metric)
    if floor is not None:
      axes.axhline(floor, color="grey", linestyle=style, linewidth=0.8, label=f"{label}: real data")
  axes.set(xscale="log", yscale="log", xlabel="NFE (network evaluations per image)", ylabel=metric)
  axes.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.15))
  figure.savefig(_OUTPUT.value, dpi=120, bbox_inches="tight")
  print(_table(every_curve))
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
