"""No import in mae_jax/ runs upward: the layers of the design, lowest first, in RANKS.

Every `import` and `from ... import` in every module of mae_jax/, at module level and inside
functions, is read with `ast` and checked against RANKS: a module may import a module of a
lower rank, a module of its own flat package (data/*, evaluation/*), and, on the top rank only,
another entry point. Everything else is an import that runs upward or sideways, and the
test names it with its file and line.
"""
import ast
import os

from helpers import ROOT

# The layers, lowest first.
(BASE,  # what every layer may use: the path layer (local or gs://), checks of user values
 PARTS,  # the model's pure pieces and the training parts: none knows another
 STORED,  # over the training parts: config checks (no model: `sizes.check` has the model's),
         # the workdir (lock, config history), parameter dirs
 VIT, MAE, MODELS,  # the model, one layer each: patches, masking, posembed -> vit -> mae -> sizes
 USES_MODEL,  # the pure train step and FLOP counts: model + optim
 PROGRAM,  # the one program builder and the one training loop
 PRETRAINED,  # a trained or converted model loaded from disk
 EVALUATION,  # kNN, linear probe, fine-tuning
 TRAINER,  # the loop: wires everything
 ENTRY,  # the commands; one may use another (an error class, say)
 ) = range(12)
RANK_NAMES = ["base", "parts", "stored", "vit", "mae", "sizes", "uses the model",
              "program and loop", "pretrained", "evaluation", "trainer", "entry points"]

# Module paths under mae_jax/ (a package's name covers its modules; the longest name that
# matches counts). A module missing here fails the test: place it when you add it.
RANKS = {
    "__init__": BASE, "paths": BASE, "checks": BASE, "tools.hlo": BASE,
    "model": BASE, "train": BASE,  # the packages' __init__ (docstrings only)
    "model.patches": PARTS, "model.masking": PARTS, "model.posembed": PARTS,
    "model.kernels": PARTS,
    "train.optim": PARTS, "train.sharding": PARTS, "train.checkpoints": PARTS,
    "train.logger": PARTS, "train.distributed": PARTS, "train.stages": PARTS, "data": PARTS,
    "train.workdirs": STORED, "train.param_dirs": STORED, "train.config": STORED,
    "model.vit": VIT, "model.mae": MAE, "model.sizes": MODELS,
    "train.train_step": USES_MODEL,
    "train.program": PROGRAM, "train.loop": PROGRAM,
    "train.pretrained": PRETRAINED,
    "evaluation": EVALUATION,
    "trainer": TRAINER,
    "tools": ENTRY,
    # `python -m mae_jax.<command>`: each runs its mae_jax.tools module
    "pretrain": ENTRY, "evaluate": ENTRY, "bench": ENTRY, "sweep": ENTRY, "convert": ENTRY,
    "aot": ENTRY, "prepare": ENTRY, "conv_mae": ENTRY, "visualize": ENTRY,
    "checkpoint": ENTRY,
}
# Packages whose modules may import each other whatever their order (each is one layer).
FLAT_PACKAGES = ("data", "evaluation")

def module_names(root):
  """{module name relative to mae_jax ("data.source", "__init__" for the package): path}."""
  package = os.path.join(root, "mae_jax")
  names = {}
  for directory, _, files in os.walk(package):
    for f in files:
      if f.endswith(".py"):
        parts = os.path.relpath(os.path.join(directory, f), package)[:-3].split(os.sep)
        if parts[-1] == "__init__" and len(parts) > 1:
          parts = parts[:-1]
        names[".".join(parts)] = os.path.join(directory, f)
  return names


def imported_modules(path, name, known):
  """[(line, module imported)] of the file `path` (module `name`): every import of
  mae_jax, anywhere in the file, resolved to the module it loads (`from mae_jax import
  config` loads config; `from mae_jax.vit import Block` loads vit)."""
  is_package = os.path.basename(path) == "__init__.py"
  parent = name if is_package else name.rpartition(".")[0]
  found = []
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: mae_jax.<parent minus level-1 components>.<module>
        up = parent.split(".") if parent and parent != "__init__" else []
        up = up[:len(up) - (node.level - 1)] if node.level > 1 else up
        base = ".".join(["mae_jax", *up, *([base] if base else [])])
      targets = [f"{base}.{a.name}" if relative(f"{base}.{a.name}") in known else base
                 for a in node.names]
    else:
      continue
    found += [(node.lineno, relative(t)) for t in targets if relative(t) is not None]
  return sorted(found)


def relative(module):
  """"mae_jax.data.source" -> "data.source", "mae_jax" -> "__init__"; None outside."""
  if module == "mae_jax":
    return "__init__"
  return module[len("mae_jax."):] if module.startswith("mae_jax.") else None


def rank_of(name):
  """(rank, the RANKS key that gives it) of a module name, or (None, None)."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    key = ".".join(parts[:n])
    if key in RANKS:
      return RANKS[key], key
  return None, None


def allowed(importer, imported):
  """Whether module `importer` may import module `imported`."""
  low, high = rank_of(imported)[0], rank_of(importer)[0]
  same_package = (importer.split(".")[0] == imported.split(".")[0]
                  and importer.split(".")[0] in FLAT_PACKAGES)
  return same_package or low < high or low == high == ENTRY


def violations(root=ROOT):
  """[(importer, imported, "file:line: message")] of every import against the rule."""
  known = module_names(root)
  found = []
  for name, path in sorted(known.items()):
    rank, _ = rank_of(name)
    assert rank is not None, (f"{os.path.relpath(path, root)} has no rank: add "
                              f"{name.split('.')[0]!r} to RANKS in tests/test_architecture.py")
    for line, imported in imported_modules(path, name, known):
      if imported not in known:
        continue  # not a module of mae_jax (an unresolved name fails at import instead)
      if not allowed(name, imported):
        where = f"{os.path.relpath(path, root)}:{line}"
        low = RANK_NAMES[rank_of(imported)[0]]
        found.append((name, imported,
                      f"{where}: mae_jax.{name} ({RANK_NAMES[rank]}) imports mae_jax."
                      f"{imported} ({low}), which is not below it"))
  return found


def test_no_import_runs_upward():
  new = [message for _, _, message in violations()]
  assert not new, "imports against the layers (tests/test_architecture.py):\n" + "\n".join(new)


def test_config_does_not_import_the_model():
  """The run's field checks know no model: the model's fields are checked by
  mae_jax.model.sizes.check, which the commands call."""
  known = module_names(ROOT)
  imported = [m for _, m in imported_modules(known["train.config"], "train.config", known)]
  assert imported and not [m for m in imported if m.split(".")[0] == "model"], imported


def write_package(root, files):
  """A package tree root/mae_jax/... holding `files` ({relative path: source})."""
  for relative, source in files.items():
    path = root / "mae_jax" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


def test_the_check_names_upward_and_sideways_imports(tmp_path):
  """The checker on a made-up tree: an upward import inside a function, a sideways one
  between two parts, a relative one inside data/, and what is allowed."""
  write_package(tmp_path, {
      "__init__.py": "",
      "model/__init__.py": "",
      "model/patches.py": "def f():\n  from mae_jax import trainer\n",  # upward, in a function
      "train/__init__.py": "",
      "train/optim.py": "import mae_jax.train.checkpoints\n",  # sideways: parts know nothing of each other
      "train/checkpoints.py": "",
      "model/vit.py": "from mae_jax.model.patches import patchify\n",  # down: fine
      "trainer.py": "from mae_jax.train import optim\nfrom mae_jax.model import vit\n",  # down: fine
      "tools/evaluate.py": "from mae_jax.tools.bench import X\n",  # entry point to entry point: fine
      "tools/bench.py": "",
      "data/__init__.py": "from .source import Source\n",  # inside its package: fine
      "data/source.py": "from ..model.vit import Block\n",  # relative, upward
  })
  found = {(a, b): message for a, b, message in violations(str(tmp_path))}
  assert set(found) == {("model.patches", "trainer"), ("train.optim", "train.checkpoints"),
                        ("data.source", "model.vit")}
  assert found["model.patches", "trainer"] == (
      "mae_jax/model/patches.py:2: mae_jax.model.patches (parts) imports mae_jax.trainer "
      "(trainer), which is not below it")
  assert found["data.source", "model.vit"].startswith(
      "mae_jax/data/source.py:1: mae_jax.data.source")


def test_a_module_without_a_rank_is_named(tmp_path):
  write_package(tmp_path, {"__init__.py": "", "unplaced.py": ""})
  try:
    violations(str(tmp_path))
  except AssertionError as e:
    assert "mae_jax/unplaced.py has no rank: add 'unplaced' to RANKS" in str(e)
  else:
    raise AssertionError("a module without a rank passed")
