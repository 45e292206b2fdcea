"""Time to quality of a sweep's arms: the wall time of each point's training against the
quality it reached, and the plot of one against the other.

  python benchmarks/time_to_quality.py configs/ablations/schedule.py --workdir DIR \
      [--out docs/ablations/time_to_quality.png]

Reads each finished point's summary.json (train_seconds: the training loop, the compile
of every stage included, the final evaluation left out; test_masked_mse at the recipe's
size and mask ratio; its stages) and its kNN result. Prints a markdown table, one row per
arm (the points that differ only in seed): mean and sample standard deviation over the
seeds of the wall time, test masked MSE and kNN top-1, the programs compiled and their
seconds, and the wall-time ratio against the first arm (the fixed recipe), then draws
quality against wall time (every seed a dot, each arm's mean with its spread as bars).
"""
import argparse
import collections
import json
import os
import statistics

from mae_jax.tools import sweep as sweep_lib


def points(sweep, workdir):
  """[(arm label, seed, summary, kNN top-1 or None)] of the finished points."""
  out = []
  for point, directory, _ in sweep_lib.plan(sweep, workdir):
    summary = sweep_lib.read_json(os.path.join(directory, "summary.json"))
    if summary is None:
      continue
    names = sweep_lib.result_names(sweep, point, ["knn"])
    knn = sweep_lib.read_json(os.path.join(directory, f"eval_{names['knn']}.json"))
    arm = ", ".join(label(k, v) for k, v in point["values"].items() if k != "seed")
    out.append((arm, point["values"].get("seed"), summary, knn and knn["top1"]))
  return out


def label(field, value):
  """A short name of an axis value: a schedule as its values in order ('16>24>28 px'),
  an empty one as 'fixed'."""
  name = field.split(".")[-1]
  if field.startswith("schedule."):
    unit = " px" if name == "resolution" else ""
    return f"{name} " + (">".join(str(v) for _, v in value) + unit if value else "fixed")
  return f"{name} {value}"


def mean_sd(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def arms(rows):
  """{arm: {metric: (mean, sd)}, ...} in the order the arms first appear."""
  grouped = collections.OrderedDict()
  for arm, _, summary, knn in rows:
    grouped.setdefault(arm, []).append((summary, knn))
  out = collections.OrderedDict()
  for arm, runs in grouped.items():
    compile_s = [sum(s.get("compile_seconds") or 0 for s in summary.get("stages", []))
                 for summary, _ in runs]
    out[arm] = {
        "seeds": len(runs),
        "wall_s": mean_sd([s["train_seconds"] for s, _ in runs]),
        "test_masked_mse": mean_sd([s["test_masked_mse"] for s, _ in runs]),
        "knn_top1": mean_sd([k for _, k in runs]),
        "programs": len({(st["image_size"], st["mask_ratio"])
                         for st in runs[0][0].get("stages", [])}) or 1,
        "compile_s": mean_sd(compile_s),
    }
  return out


def table(summary):
  first = next(iter(summary.values()))["wall_s"][0]
  lines = ["| arm | seeds | wall s | x fixed | test masked MSE | kNN top-1 | programs "
           "(compile s) |", "|---|---|---|---|---|---|---|"]
  for arm, a in summary.items():
    knn = a["knn_top1"]
    lines.append(
        f"| {arm} | {a['seeds']} | {a['wall_s'][0]:.0f} ± {a['wall_s'][1]:.0f} | "
        f"{first / a['wall_s'][0]:.2f} | {a['test_masked_mse'][0]:.4f} ± "
        f"{a['test_masked_mse'][1]:.4f} | "
        + (f"{knn[0]:.1%} ± {knn[1]:.1%}" if knn[0] is not None else "n/a")
        + f" | {a['programs']} ({a['compile_s'][0]:.0f}) |")
  return "\n".join(lines)


def plot(rows, summary, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, metric, label in ((axes[0], "test_masked_mse", "test masked MSE (lower is better)"),
                            (axes[1], "knn_top1", "kNN top-1 (higher is better)")):
    for i, (arm, a) in enumerate(summary.items()):
      color = f"C{i}"
      xs = [s["train_seconds"] for r_arm, _, s, _ in rows if r_arm == arm]
      ys = [(s[metric] if metric != "knn_top1" else k) for r_arm, _, s, k in rows
            if r_arm == arm]
      ax.scatter(xs, ys, color=color, alpha=0.4, s=18)
      if a[metric][0] is not None:
        ax.errorbar(a["wall_s"][0], a[metric][0], xerr=a["wall_s"][1], yerr=a[metric][1],
                    color=color, marker="o", capsize=3, label=arm)
    first = next(iter(summary.values()))[metric][0]
    if first is not None:
      ax.axhline(first, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("training wall time (s), compiles included")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("sweep_file")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default=None, help="the plot's PNG (default: none)")
  args = p.parse_args(argv)
  rows = points(sweep_lib.load_sweep(args.sweep_file), args.workdir)
  if not rows:
    raise SystemExit(f"error: no finished point of {args.sweep_file} in {args.workdir}")
  summary = arms(rows)
  print(table(summary))
  print(json.dumps(summary))
  if args.out:
    plot(rows, summary, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
  main()
