"""Run an ablation sweep: one pretraining + evaluation per point, then a table and plots.

  python -m mae_jax.sweep configs/ablations/mask_ratio.py --workdir workdirs/ablations
  python -m mae_jax.sweep configs/ablations/mask_ratio.py --workdir DIR --commands
  python -m mae_jax.sweep configs/ablations/mask_ratio.py --workdir DIR --collect

A sweep file defines get_sweep() -> dict:
  name          the sweep's name: its outputs go to DIR/<name>/
  base          pretraining recipe of the ViT points (default configs/default.py)
  conv_base     recipe of the conv points (default configs/conv_mae.py)
  overrides     {config field: value} for every ViT point (e.g. the budget: num_steps)
  conv_overrides  the same for conv points
  eval_config   evaluation recipe (default configs/eval.py)
  eval_overrides  {field: value} of the evaluation recipe, for every point
  evals         evaluations per point: "knn,linprobe" (add ",finetune" for fine-tuning)
  axes          {config field: [values]}: every combination is a point, or
  exclude       (with axes) [{axis: value, ...}]: the combinations that match every field
                of one of these are left out
  points        [{"label": str, "program": "mae" | "conv", "overrides": {...}}, ...]
                An eval.FIELD axis or override is a field of the evaluation recipe
                ("eval.init": ["pretrained", "random"]); a point's seed seeds its
                evaluation too, unless it sets eval.seed.
  plot_x        the field on the plots' x axis (default: the first axis)

Each point runs in DIR/points/<hash of its pretraining command>/ (shared by the sweeps of
a DIR) as `python -m mae_jax.pretrain` then `python -m mae_jax.evaluate`, or
`python -m mae_jax.conv_mae`, logging to its log.txt; running the same command again
resumes the sweep. --commands writes DIR/<name>/commands.sh instead, one line per point, for
a cluster scheduler; --collect afterwards makes the table. Outputs in DIR/<name>/:
results.csv, results.md and PNG plots against plot_x (with a `seed` axis, mean ± standard
deviation over the seeds too; with fine-tuning, finetune_curves.png). DIR may be
gs://BUCKET/PATH. docs/ablations.md tells the rest.
"""
import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

from mae_jax import paths
from mae_jax.tools import cli

PROGRAMS = ("mae", "conv")
EVAL_PREFIX = "eval."  # an axis or point field of the evaluation recipe: eval.init, ...
EVALS = ("knn", "linprobe", "finetune")
# Result columns: (name, header in the markdown table, formatter).
METRICS = (
    ("final_train_loss", "train loss", "{:.4f}"),
    ("test_masked_mse", "test masked MSE", "{:.4f}"),
    ("knn_top1", "kNN top-1", "{:.1%}"),
    ("linprobe_top1", "lin. probe top-1", "{:.1%}"),
    ("finetune_top1", "fine-tune top-1", "{:.1%}"),
    ("images_per_sec", "img/s", "{:.0f}"),
    ("wall_seconds", "wall s", "{:.0f}"),
)
PLOTTED = ("knn_top1", "linprobe_top1", "finetune_top1", "test_masked_mse", "images_per_sec")
SEED_AXIS = "seed"  # an axis of this name is repetitions, summarized by mean +- spread
SWEEP_KEYS = ("name", "base", "conv_base", "overrides", "conv_overrides", "eval_config",
              "eval_overrides", "evals", "axes", "exclude", "points", "plot_x")
DEFAULTS = {"base": "configs/default.py", "conv_base": "configs/conv_mae.py",
            "eval_config": "configs/eval.py", "evals": "knn,linprobe"}


class SweepError(ValueError):
  """A sweep file that cannot run (one line saying why)."""


class PointsFailedError(RuntimeError):
  """Some points ran but left no results (their log.txt says why)."""


def call_file(path, function, what, module_name):
  """function() of a Python file, its failures as one SweepError."""
  try:
    module = cli.load_python_file(path, what, module_name)
    return cli.call_user_function(module, path, function, what)
  except cli.UsageError as e:
    raise SweepError(str(e)) from None


def load_sweep(path):
  """get_sweep() of a sweep file, checked, with defaults filled in."""
  root = package_root(path)
  if root not in sys.path:  # sweep files share settings through their package (configs.ablations)
    sys.path.insert(0, root)
  sweep = call_file(path, "get_sweep", "a sweep file defining get_sweep()", "sweep_file")
  if not isinstance(sweep, dict):
    raise SweepError(f"{path}: get_sweep() returned a {type(sweep).__name__}; expected a dict")
  unknown = set(sweep) - set(SWEEP_KEYS)
  if unknown:
    raise SweepError(f"{path}: unknown sweep keys {sorted(map(str, unknown))}")
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(sweep.get("name", ""))):
    raise SweepError(f"{path}: 'name' must be a non-empty file name ([A-Za-z0-9_.-])")
  if bool(sweep.get("axes")) == bool(sweep.get("points")):
    raise SweepError(f"{path}: give exactly one of 'axes' and 'points'")
  sweep = {**DEFAULTS, **sweep, "path": os.path.abspath(path)}  # recipes may be beside it
  check_types(sweep, path)
  for key in ("overrides", "conv_overrides", "eval_overrides"):
    sweep[key] = dict(sweep.get(key) or {})
  for e in filter(None, sweep["evals"].split(",")):
    if e not in EVALS:
      raise SweepError(f"{path}: evals: {e!r} is not one of {', '.join(EVALS)}")
  return sweep


def _expect(ok, path, key, expected, value):
  if not ok:
    raise SweepError(f"{path}: {key} is {value!r:.80}; expected {expected}")


def check_types(sweep, path):
  """Each key of a sweep holds the kind of value the sweep needs."""
  for key in ("base", "conv_base", "eval_config"):
    _expect(isinstance(sweep[key], str) and sweep[key], path, key, "a recipe path", sweep[key])
  for key in ("overrides", "conv_overrides", "eval_overrides"):
    value = sweep.get(key)
    _expect(value is None or isinstance(value, dict) and all(
        isinstance(k, str) for k in value), path, key, "a dict {config field: value}", value)
  _expect(isinstance(sweep["evals"], str), path, "evals",
          "a comma-separated string, e.g. 'knn,linprobe'", sweep["evals"])
  _expect(isinstance(sweep.get("plot_x") or "", str), path, "plot_x", "a field name",
          sweep.get("plot_x"))
  axes = sweep.get("axes")
  if axes:
    _expect(isinstance(axes, dict), path, "axes", "a dict {config field: [values]}", axes)
    for field, values in axes.items():
      _expect(isinstance(field, str) and isinstance(values, (list, tuple)) and values,
              path, f"axes[{field!r}]", "a non-empty list of values", values)
  exclude = sweep.get("exclude")
  if exclude is not None:
    _expect(isinstance(exclude, (list, tuple)) and all(
        isinstance(e, dict) and e for e in exclude) and axes, path, "exclude",
            "a list of non-empty dicts {axis: value} beside 'axes'", exclude)
    for i, entry in enumerate(exclude):
      for field, value in entry.items():
        _expect(field in axes and value in axes[field], path, f"exclude[{i}][{field!r}]",
                "an axis and one of its values", value)
  points = sweep.get("points")
  if points:
    _expect(isinstance(points, (list, tuple)) and all(isinstance(p, dict) for p in points),
            path, "points", "a list of dicts {label, program, overrides}", points)
    for i, p in enumerate(points):
      _expect(isinstance(p.get("overrides") or {}, dict), path, f"points[{i}].overrides",
              "a dict {config field: value}", p.get("overrides"))


def label_of(values):
  """`field=value,...` of {config field: value}, each field by its last part."""
  return ",".join(f"{f.split('.')[-1]}={fmt_value(v)}" for f, v in values.items())


def expand_points(sweep):
  """[{"label", "program", "overrides", "values"}]: `values` are the point's axis values."""
  if sweep.get("axes"):
    fields = list(sweep["axes"])
    combos = [dict(zip(fields, c)) for c in itertools.product(*sweep["axes"].values())]
    points = [{"label": label_of(v), "program": "mae", "overrides": v, "values": v}
              for v in combos if not any(all(v[f] == x for f, x in e.items())
                                         for e in sweep.get("exclude") or ())]
    if not points:
      raise SweepError("exclude leaves no point to run")
    return points
  points = []
  for i, p in enumerate(sweep["points"]):
    if "label" not in p:
      raise SweepError(f"points[{i}] has no 'label'")
    p = dict(p, program=p.get("program", "mae"), overrides=dict(p.get("overrides") or {}),
             values={"point": p["label"]})
    if p["program"] not in PROGRAMS:
      raise SweepError(f"points[{i}]: program {p['program']!r} is not one of {PROGRAMS}")
    points.append(p)
  if len({p["label"] for p in points}) != len(points):
    raise SweepError("point labels must be unique")
  return points


def fmt_value(value):
  """A config value as ml_collections' --config.FIELD=VALUE parses it."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(fmt_value(v) for v in value) + (",)" if len(value) == 1 else ")")
  return str(value)


def flags(prefix, overrides):
  return [f"--{prefix}.{k}={fmt_value(v)}" for k, v in sorted(overrides.items())]


def package_root(path):
  """The directory above the Python package that holds the file `path` (the file's own
  directory if it is in none): configs/ablations/x.py -> the directory holding configs/."""
  directory = os.path.dirname(os.path.abspath(path))
  while os.path.isfile(os.path.join(directory, "__init__.py")):
    directory = os.path.dirname(directory)
  return directory


def resolve(sweep, key):
  """The recipe path sweep[key]: absolute, relative to the working directory, or else to
  the sweep file's package root (configs/default.py beside configs/ablations)."""
  path = sweep[key]
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path)
  return os.path.join(package_root(sweep["path"]), path)


def recipe(path):
  """get_config() of a recipe file."""
  return call_file(path, "get_config", "a recipe defining get_config()", "sweep_recipe")


def without_defaults(recipe_path, overrides):
  """The overrides that change the recipe (values equal to its own are dropped, so a
  point is the same point in every sweep that contains it); unknown fields are errors."""
  config = recipe(recipe_path)
  kept = {}
  for field, value in overrides.items():
    node = config
    try:
      for part in field.split("."):
        node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise SweepError(f"{field}: no such field in {recipe_path}") from None
    same = (list(node) == list(value) if isinstance(value, (list, tuple))
            and isinstance(node, (list, tuple)) else node == value and type(node) is type(value))
    if not same:
      kept[field] = value
  return kept


def split_overrides(sweep, point):
  """(pretraining, evaluation) overrides of a point: the sweep's, then its own (eval.FIELD to
  the evaluation recipe); its seed seeds the evaluation too, unless it sets eval.seed."""
  own = point["overrides"]
  evaluation = {k[len(EVAL_PREFIX):]: v for k, v in own.items() if k.startswith(EVAL_PREFIX)}
  own = {k: v for k, v in own.items() if not k.startswith(EVAL_PREFIX)}
  if "seed" in own:
    evaluation.setdefault("seed", own["seed"])
  base = sweep["conv_overrides" if point["program"] == "conv" else "overrides"]
  return dict(base, **own), dict(sweep["eval_overrides"], **evaluation)


def point_commands(sweep, point, point_dir):
  """The subprocess argv lists that produce a point's results in point_dir."""
  py, evals, conv = sys.executable, sweep["evals"], point["program"] == "conv"
  eval_cfg = resolve(sweep, "eval_config")
  pretraining, evaluation = split_overrides(sweep, point)
  evaluation = without_defaults(eval_cfg, evaluation)
  base = resolve(sweep, "conv_base" if conv else "base")
  train = ["--config", base, "--workdir", point_dir,
           *flags("config", without_defaults(base, pretraining))]
  if conv:
    return [[py, "-m", "mae_jax.conv_mae", *train, "--eval_config", eval_cfg,
             *flags("eval_config", evaluation),
             "--mode", ",".join(e for e in evals.split(",") if e != "finetune")]]
  commands = [[py, "-m", "mae_jax.pretrain", *train]]
  if evals:
    commands.append([py, "-m", "mae_jax.evaluate", "--workdir", point_dir, "--mode", evals,
                     "--config", eval_cfg, *flags("config", evaluation)])
  return commands


def portable(argv):
  """An argv as a point's hash sees it: the interpreter and the --workdir value left out, and
  a recipe file inside a Python package (configs/default.py) named relative to the directory
  above the package, so a point directory keeps its name in another checkout or machine."""
  out = []
  for i, arg in enumerate(argv[1:], 1):
    if argv[i - 1] == "--workdir":
      arg = "__DIR__"
    elif os.path.isabs(arg) and arg.endswith(".py"):
      root = package_root(arg)
      if root != os.path.dirname(arg):
        arg = os.path.relpath(arg, root)
    out.append(arg)
  return out


def digest(commands):
  """Hash of argv lists, as `portable` writes them."""
  return hashlib.sha256(json.dumps([portable(c) for c in commands]).encode()).hexdigest()[:12]


def finished_runs(directory):
  """{digest of a point's commands: its row} of the runs finished in a point directory
  (point.json; several points share a directory when only their evaluations differ)."""
  done = read_json(paths.join(directory, "point.json")) or {}
  return {done["commands"]: done} if "commands" in done else done  # one-run form


def is_done(directory, commands):
  """point.json's record of a finished run of exactly these commands, or None."""
  return finished_runs(directory).get(digest(commands))


def record_done(directory, commands, row, seconds):
  """Add this run to point.json."""
  runs = finished_runs(directory)
  runs[digest(commands)] = dict(row, commands=digest(commands), run_seconds=round(seconds, 1))
  paths.write_atomic(paths.join(directory, "point.json"), json.dumps(runs, indent=2))


def plan(sweep, workdir):
  """[(point, its directory, its commands)] in sweep order. The directory is
  DIR/points/<hash of the pretraining command>: a point shared by several sweeps pretrains
  once, and changed evaluation settings reuse the pretraining."""
  planned = []
  for point in expand_points(sweep):
    template = point_commands(sweep, point, "__DIR__")
    directory = paths.join(workdir, "points", digest(template[:1]))
    planned.append((point, directory, [[directory if a == "__DIR__" else a for a in c]
                                       for c in template]))
  return planned


def read_json(path):
  """The JSON in `path` (local or gs://); None where it is missing or unreadable."""
  try:
    return json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return None


def collect(sweep, point, directory):
  """The point's row from the files its commands wrote; None if any is missing."""
  summary = read_json(paths.join(directory, "summary.json"))
  if summary is None:
    return None
  row = {"label": point["label"], "program": point["program"], **point["values"]}
  # An encoder evaluated at its random init owes nothing to the pretraining that shares its
  # directory: its row leaves the pretraining's figures and time out.
  conv = point["program"] == "conv"
  pretrained = conv or eval_init(sweep, point) != "random"
  if pretrained:
    row.update({k: summary.get(k) for k in ("final_train_loss", "test_masked_mse",
                                            "images_per_sec")})
  wall = (summary.get("train_seconds") or 0.0) if pretrained else 0.0
  evals = [e for e in sweep["evals"].split(",") if e and not (conv and e == "finetune")]
  names = result_names(sweep, point, evals)
  for e in evals:
    result = read_json(paths.join(directory, f"eval_{names[e]}.json"))
    if result is None:
      return None
    row[f"{e}_top1"] = result["top1"]
    if e == "finetune" and result.get("history"):
      row["finetune_curve"] = [(h["epoch"], h["top1"]) for h in result["history"]]
    wall += result.get("seconds") or 0.0
  # Pretraining loop (where used) + evaluations as their files record them (no start-up, no
  # final reconstruction test): the same whichever run produced them.
  row["wall_seconds"] = round(wall, 1)
  return row


def result_names(sweep, point, evals):
  """{mode: the name of its results file} of a point's evaluations (the conv baseline's
  are named by mode; mae_jax.evaluate's by mode, init and features)."""
  if point["program"] == "conv":
    return {e: e for e in evals}
  from mae_jax.tools.evaluate import result_name  # pylint: disable=g-import-not-at-top
  fields = recipe(resolve(sweep, "eval_config"))
  evaluation = split_overrides(sweep, point)[1]
  init = evaluation.get("init", fields.init)
  return {e: result_name(e, init, evaluation.get(f"{e}.features", fields[e].get("features")))
          for e in evals}


def eval_init(sweep, point):
  """The encoder a ViT point evaluates: "pretrained" or "random" (eval.init)."""
  evaluation = split_overrides(sweep, point)[1]
  return evaluation.get("init", recipe(resolve(sweep, "eval_config")).init)


def run_point(point, directory, commands, log, index, total):
  """Run a point's commands but a finished pretraining; their seconds, or None on a failure."""
  paths.makedirs(directory)
  wall = 0.0
  log_path = paths.join(directory, "log.txt")
  with point_log(log_path) as out:
    for argv in commands:
      what = argv[2]  # [python, -m, module, ...]
      if what == "mae_jax.pretrain" and read_json(paths.join(directory, "summary.json")):
        continue  # pretraining finished earlier; only the evaluation is left
      log(f"[{index}/{total}] {point['label']}: {what} ...")
      print(f"$ {shlex.join(argv)}", file=out, flush=True)
      t0 = time.perf_counter()
      code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT)
      wall += time.perf_counter() - t0
      if code != 0:
        log(f"[{index}/{total}] {point['label']}: FAILED ({what} exit {code}); see {log_path}")
        return None
  return wall


@contextlib.contextmanager
def point_log(path):
  """A text file to append a point's log to: `path` itself, or for gs:// (objects are
  replaced whole, never appended to) a temporary file added to the object at the end."""
  if not paths.is_gcs(path):
    with open(path, "a") as out:
      yield out
    return
  with tempfile.TemporaryFile("w+") as out:
    try:
      yield out
    finally:
      out.flush()
      out.seek(0)
      previous = paths.read_text(path) if paths.exists(path) else ""
      paths.write_atomic(path, previous + out.read())


def format_cell(value, formatter, std=None):
  """A table cell: "—" for no value, a string as it is, else formatted (`± std` with one)."""
  if value is None or value == "":
    return "—"
  if isinstance(value, str):
    return value
  return formatter.format(value) + ("" if std is None else " ± " + formatter.format(std))


def write_csv(path, header, rows):
  """A CSV file (local or gs://) of a header and rows."""
  f = io.StringIO(newline="")
  csv.writer(f).writerows([header, *rows])
  paths.write_atomic(path, f.getvalue())


def markdown(title, header, rows, corner=False):
  """A markdown table under a bold title; header and rows are lists of cells (`corner`: an
  empty first header cell, above the rows' labels)."""
  line = lambda cells: "| " + " | ".join(cells) + " |"
  return "\n".join([f"**{title}**", "", ("| " if corner else "") + line(header),
                    "|" + "---|" * (len(header) + corner), *map(line, rows)])


def write_table(rows, columns, path_csv, path_md, title):
  """results.csv (raw values) and results.md (formatted) of the rows, in sweep order."""
  metrics = [m for m in METRICS if any(r.get(m[0]) is not None for r in rows)]
  write_csv(path_csv, ["label", "program", *columns, *(m[0] for m in metrics)],
            [[r["label"], r["program"], *(r.get(c, "") for c in columns),
              *("" if r.get(m[0]) is None else r[m[0]] for m in metrics)] for r in rows])
  md = markdown(title, [c.split(".")[-1] for c in columns] + [m[1] for m in metrics],
                [[format_cell(r.get(c), "{}") for c in columns]
                 + [format_cell(r.get(m[0]), m[2]) for m in metrics] for r in rows])
  paths.write_atomic(path_md, md + "\n")
  return md


def aggregate_seeds(rows, columns):
  """Rows grouped over the seed axis, in sweep order: one per value of the other axes, with
  `seeds` (how many) and each metric's mean and `<metric>_std` (see `mean_std`)."""
  others = [c for c in columns if c != SEED_AXIS]
  groups = {}
  for r in rows:
    groups.setdefault(tuple(r.get(c) for c in others), []).append(r)
  out = []
  for key, members in groups.items():
    fixed = dict(zip(others, key))
    agg = {"label": label_of(fixed) or "all", "program": members[0]["program"], **fixed,
           "seeds": len(members)}
    for name, *_ in METRICS:
      values = [m[name] for m in members if m.get(name) is not None]
      if values:
        agg[name], agg[f"{name}_std"] = mean_std(values)
    curves = [m["finetune_curve"] for m in members if m.get("finetune_curve")]
    if curves:
      agg["finetune_curve"] = mean_curve(curves)
    out.append(agg)
  return out


def mean_std(values):
  """(mean, sample standard deviation with ddof=1; None for a single value)."""
  n = len(values)
  mean = sum(values) / n
  return mean, None if n == 1 else (sum((v - mean)**2 for v in values) / (n - 1))**0.5


def mean_curve(curves):
  """[(epoch, mean, std)] of several [(epoch, top1)] curves, at the epochs all reached."""
  by_epoch = [dict(c) for c in curves]
  epochs = sorted(set.intersection(*(set(c) for c in by_epoch)))
  return [(e, *mean_std([c[e] for c in by_epoch])) for e in epochs]


def pyplot():
  """matplotlib (headless) and its pyplot, imported only when a sweep plots."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return matplotlib, plt


def write_curves(items, outdir, title):
  """finetune_curves.png (test top-1 per fine-tuning epoch, one line per item, a +- std band
  for seed means) and its markdown table; the markdown, or "" where no item has a curve."""
  curves = [(i["label"], [(p[0], p[1], p[2] if len(p) > 2 else None)
                          for p in i["finetune_curve"]]) for i in items if i.get("finetune_curve")]
  if not curves:
    return ""
  matplotlib, plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
  for label, pts in curves:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if all(p[2] is not None for p in pts):
      ax.fill_between(xs, [y - p[2] for y, p in zip(ys, pts)],
                      [y + p[2] for y, p in zip(ys, pts)], alpha=0.2)
  ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
  ax.set(xlabel="fine-tuning epoch", ylabel="test top-1")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  save_png(fig, paths.join(outdir, "finetune_curves.png"))
  epochs = sorted({p[0] for _, pts in curves for p in pts})
  at = [{p[0]: p for p in pts} for _, pts in curves]
  return markdown(f"{title}: fine-tuning test top-1 after each epoch",
                  [f"epoch {fmt_value(e)}" for e in epochs],
                  [[label, *(format_cell(a[e][1], "{:.1%}", a[e][2]) if e in a else "—"
                             for e in epochs)] for (label, _), a in zip(curves, at)],
                  corner=True)


def write_seed_table(groups, columns, path_csv, title):
  """results_seeds.csv and the markdown table (mean ± std) of `aggregate_seeds` rows."""
  others = [c for c in columns if c != SEED_AXIS]
  metrics = [m for m in METRICS if any(g.get(m[0]) is not None for g in groups)]
  stats = [x for m, *_ in metrics for x in (m, m + "_std")]
  write_csv(path_csv, [*others, "seeds", *stats],
            [[*(g.get(c) for c in others), g["seeds"], *(g.get(x, "") for x in stats)]
             for g in groups])
  return markdown(f"{title}: mean ± standard deviation over seeds",
                  [c.split(".")[-1] for c in others] + ["seeds"] + [m[1] for m in metrics],
                  [[format_cell(g.get(c), "{}") for c in others] + [str(g["seeds"])]
                   + [format_cell(g.get(m), f, g.get(m + "_std")) for m, _, f in metrics]
                   for g in groups])


def bar_names(rows, xs):
  """The x tick of each row's bar: its x value, or its whole label where the x values
  repeat (other axes vary too: init=pretrained at two pretraining lengths)."""
  if len(set(map(str, xs))) == len(xs):
    return [str(x) for x in xs]
  return [r.get("label") or str(x) for x, r in zip(xs, rows)]


def write_plots(rows, x_field, outdir, title):
  """<metric>.png per metric present (against x_field: a line for numbers, bars for names;
  error bars from `<metric>_std`) and summary.png with all of them; the paths."""
  matplotlib, plt = pyplot()
  rows = [r for r in rows if r.get(x_field) is not None]
  numeric = all(isinstance(r[x_field], (int, float)) and not isinstance(r[x_field], bool)
                for r in rows)
  rows = sorted(rows, key=lambda r: r[x_field]) if numeric else rows  # stable: ties keep order
  xs = [r[x_field] for r in rows]
  series = {name: [(x, r[name], r.get(f"{name}_std"), n)
                   for x, r, n in zip(xs, rows, bar_names(rows, xs)) if r.get(name) is not None]
            for name in PLOTTED}
  series = {name: pts for name, pts in series.items() if pts}

  def draw(ax, name):
    pts = series[name]
    err = ([0.0 if p[2] is None else p[2] for p in pts]  # a single seed: no bar
           if any(p[2] is not None for p in pts) else None)
    if numeric:
      ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, marker="o", capsize=3)
    else:
      ax.bar(range(len(pts)), [p[1] for p in pts], yerr=err, capsize=3)
      ax.set_xticks(range(len(pts)), [p[3] for p in pts], rotation=20, fontsize=7)
    if name.endswith("top1"):
      ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set(xlabel=x_field.split(".")[-1], ylabel=dict(m[:2] for m in METRICS)[name])
    ax.grid(alpha=0.3)

  written = []
  for name in series:
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    draw(ax, name)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    written.append(save_png(fig, paths.join(outdir, f"{name}.png")))
  if series:
    fig, axes = plt.subplots(1, len(series), figsize=(3.3 * len(series), 3.0), dpi=110,
                             squeeze=False)
    for ax, name in zip(axes[0], series):
      draw(ax, name)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    written.append(save_png(fig, paths.join(outdir, "summary.png")))
  return written


def save_png(fig, path):
  """Write a matplotlib figure as a PNG to `path` (local or gs://), close it; the path."""
  png = io.BytesIO()
  fig.savefig(png, format="png")
  pyplot()[1].close(fig)
  paths.write_atomic(path, png.getvalue())
  return path


def make_outdir(workdir, outdir):
  """Make DIR/<name> and write a probe there: an unwritable folder, a missing bucket or
  an unreachable server is one SweepError before any point runs."""
  try:
    paths.makedirs(outdir)
    paths.write_probe(outdir)
  except Exception as e:  # OSError locally; gcsfs, aiohttp and google-auth errors on gs://
    detail = " ".join(str(getattr(e, "strerror", None) or e).split())[:200]
    reason = (f"{type(e).__name__}: {detail}" if not isinstance(e, FileNotFoundError)
              else f"bucket {paths.bucket(outdir)} does not exist" if paths.is_gcs(outdir)
              else "no such folder")
    raise SweepError(f"--workdir {workdir}: cannot make {outdir} there ({reason})") from None


def selects(point, only):
  """Whether every selector of `only` names `point`: its whole label or some of the label's
  comma-separated parts (`seed=1`, `seed=1,init=random`); no selectors select all."""
  parts = set(point["label"].split(","))
  return all(s == point["label"] or set(s.split(",")) <= parts for s in only)


def run_sweep(sweep, workdir, *, commands_only=False, collect_only=False, only=(), log=print):
  """Run (or write the commands of) every point, then the table and plots; the rows.
  With `only`, the points it does not select are only collected (see `selects`)."""
  outdir = paths.join(workdir, sweep["name"])
  planned = plan(sweep, workdir)  # every recipe and field checked before anything is made
  unknown = [s for s in only if not any(selects(p, [s]) for p, _, _ in planned)]
  if unknown:
    raise SweepError(f"--only {unknown[0]}: no point's label has it; labels: "
                     + ", ".join(p["label"] for p, _, _ in planned))
  make_outdir(workdir, outdir)
  if commands_only:
    write_commands(sweep, [p for p in planned if selects(p[0], only)], outdir, log)
    return []
  rows, failed = run_points(sweep, planned, only, collect_only, log)
  write_results(sweep, rows, outdir, log)
  if failed:
    raise PointsFailedError(f"{len(failed)} point(s) without results: {', '.join(failed)}")
  return rows


def write_commands(sweep, planned, outdir, log):
  """DIR/<name>/commands.sh: one shell line per planned point."""
  path = paths.join(outdir, "commands.sh")
  lines = [f"# {sweep['name']}: one line per point; then: python -m mae_jax.sweep ... --collect"]
  for _, directory, commands in planned:  # train.py makes a gs:// workdir itself
    mkdir = "" if paths.is_gcs(directory) else f"mkdir -p {shlex.quote(directory)} && "
    lines.append(mkdir + " && ".join(shlex.join(c) for c in commands))
  paths.write_atomic(path, "\n".join(lines) + "\n")
  log(f"{len(planned)} commands -> {path}")


def run_points(sweep, planned, only, collect_only, log):
  """Run the selected points not done before; (the rows of every point with results,
  the labels of the selected points without)."""
  rows, failed = [], []
  for i, (point, directory, commands) in enumerate(planned, 1):
    tag = f"[{i}/{len(planned)}] {point['label']}"
    row = collect(sweep, point, directory)
    selected = selects(point, only)
    if selected and (collect_only or row is not None and is_done(directory, commands) is not None):
      if row is None:
        log(f"{tag}: no results in {directory}")
      elif not collect_only:
        log(f"{tag}: done before, skipped")
    elif selected:
      wall = run_point(point, directory, commands, log, i, len(planned))
      row = collect(sweep, point, directory) if wall is not None else None
      if row is not None:
        record_done(directory, commands, row, wall)
        log(f"{tag}: " + ", ".join(f"{m[1]} {format_cell(row.get(m[0]), m[2])}"
                                   for m in METRICS if row.get(m[0]) is not None))
    if row is not None:
      rows.append(row)
    elif selected:
      failed.append(point["label"])
  return rows, failed


def write_results(sweep, rows, outdir, log):
  """The table (mean ± spread over a seed axis, fine-tuning curves) and the plots."""
  columns = list(sweep["axes"]) if sweep.get("axes") else ["point"]
  title = sweep["name"]
  table = write_table(rows, columns, paths.join(outdir, "results.csv"),
                      paths.join(outdir, "results.md"), title)
  x_field = sweep.get("plot_x") or columns[0]
  plotted = rows
  groups = aggregate_seeds(rows, columns) if SEED_AXIS in columns and rows else None
  if groups:
    table += "\n\n" + write_seed_table(groups, columns,
                                        paths.join(outdir, "results_seeds.csv"), title)
    if x_field == SEED_AXIS:
      x_field = next((c for c in columns if c != SEED_AXIS), SEED_AXIS)
    if x_field != SEED_AXIS:
      plotted = groups
  curves = write_curves(groups or rows, outdir, title)
  if curves:
    table += "\n\n" + curves
  paths.write_atomic(paths.join(outdir, "results.md"), table + "\n")
  plots = write_plots(plotted, x_field, outdir, title) if rows else []
  log(table)
  log(f"results: {paths.join(outdir, 'results.csv')}, results.md"
      + (f", {len(plots)} plots" if plots else ""))


def main(argv=None):
  p = cli.ArgumentParser(prog="python -m mae_jax.sweep", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("sweep", help="a sweep file (configs/ablations/*.py)")
  p.add_argument("--workdir", required=True, help="points and results go here")
  group = p.add_mutually_exclusive_group()
  group.add_argument("--commands", action="store_true",
                     help="write DIR/<name>/commands.sh (one line per point) and stop")
  group.add_argument("--collect", action="store_true",
                     help="run nothing: tabulate the points that have results")
  p.add_argument("--only", action="append", default=[], metavar="SELECTOR",
                 help="run only the points whose label is SELECTOR or has its comma-separated "
                      "parts among its own (e.g. seed=1 or seed=1,init=random); repeat to "
                      "narrow; the other points' finished results still go in the table. Lets "
                      "several launches, on one machine or several, share a sweep")
  args = p.parse_args(argv)
  try:
    if not args.workdir.strip():
      raise SweepError("--workdir: empty; expected a directory for the points and results")
    try:
      workdir = paths.absolute(args.workdir)
    except paths.PathError as e:
      raise SweepError(f"--workdir: {e}") from None
    run_sweep(load_sweep(args.sweep), workdir, commands_only=args.commands,
              collect_only=args.collect, only=args.only, log=lambda m: print(m, flush=True))
  except (SweepError, PointsFailedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, SweepError) else 1)


run = main  # the console script `mae-sweep` (argv from sys.argv)

if __name__ == "__main__":
  run()
