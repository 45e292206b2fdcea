"""What every command line of mae_jax shares: bad input is one `error:` line on stderr and
exit 2, found before any long work starts, never a traceback.

`ArgumentParser` answers a bad flag in one line (argparse prints its usage first); the
argparse types refuse values no command can use (a zero batch, a NaN ratio);
`check_output_file` and `load_python_file` check the files a command writes and reads before
it computes anything; `flag_error` words absl's and ml_collections' errors about a recipe's
flags in one line. A recipe's fields are checked by mae_jax.checks.
"""
import argparse
import importlib.util
import math
import os
import re
import sys
import traceback

from mae_jax.checks import has_tpu_chips


def default_recipe(name):
  """configs/<name> for a command's default --config: the current directory's where it
  has one (a checkout, or the user's own copy), else the one beside the installed package
  (a checkout's, or the `configs` package installed with mae_jax)."""
  local = os.path.join("configs", name)
  if os.path.isfile(local):
    return local
  beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", name)
  if os.path.isfile(beside):
    return beside
  spec = importlib.util.find_spec("configs")
  for directory in (spec.submodule_search_locations or []) if spec else []:
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return local  # not found: loading it names the file


class UsageError(ValueError):
  """Bad input on a command line: the message is one line naming the flag or file."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse with a bad flag as one `error: ...` line and exit 2 (no usage dump)."""

  def error(self, message):
    fail(f"{self.prog}: {message}")


def report(message):
  """Print `error: message` on stderr as one line; returns 2, the exit code of bad input."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  return 2


def fail(message):
  """Print `error: message` (one line) on stderr and exit 2."""
  sys.exit(report(message))


def _number(text, cast, ok, expected):
  try:
    value = cast(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not valid; expected {expected}") from None
  if not ok(value):
    raise argparse.ArgumentTypeError(f"{text!r} is not valid; expected {expected}")
  return value


def positive_int(text):
  return _number(text, int, lambda v: v >= 1, "an int >= 1")


def nonnegative_int(text):
  return _number(text, int, lambda v: v >= 0, "an int >= 0")


def positive_float(text):
  return _number(text, float, lambda v: math.isfinite(v) and v > 0,
                 "a finite number > 0")


def open_unit_float(text):
  """A float strictly between 0 and 1 (a mask ratio)."""
  return _number(text, float, lambda v: 0 < v < 1, "a number in (0, 1)")


def check_output_file(path, flag):
  """Raise UsageError unless `path` can be created or replaced as a file: its folder
  exists and takes files, and the path itself is not a folder. Nothing is written."""
  if not path:
    raise UsageError(f"{flag}: empty path; expected a file to write")
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  if os.path.isdir(path):
    raise UsageError(f"{flag} {path}: is a directory; expected a file to write")
  if not os.path.isdir(parent):
    raise UsageError(f"{flag} {path}: the folder {parent} does not exist; create it first")
  if not os.access(parent, os.W_OK | os.X_OK) or (
      os.path.exists(path) and not os.access(path, os.W_OK)):
    raise UsageError(f"{flag} {path}: not writable (permission denied)")
  return path


def check_output_dir(path, flag):
  """Raise UsageError unless `path` is a new folder that can be made in an existing,
  writable parent. Nothing is written."""
  if not path:
    raise UsageError(f"{flag}: empty path; expected a new folder")
  path = os.path.abspath(path)
  if os.path.lexists(path):
    raise UsageError(f"{flag} {path}: already exists; choose a new output directory")
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    raise UsageError(f"{flag} {path}: the folder {parent} does not exist; create it first")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"{flag} {path}: cannot create it in {parent} (permission denied)")
  return path


def _first_line(error):
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def user_code_error(error, files):
  """(the exception, its innermost frame in one of `files`) where the code of one of those
  files (recipes) raised `error` or an exception it wraps (__cause__, __context__); None
  where none of them did."""
  files = {os.path.abspath(f) for f in files}
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) in files]
    if frames:
      return error, frames[-1]
    error = error.__cause__ or error.__context__
  return None


def recipe_files(argv, defaults=()):
  """The recipe files a command line names (--config=F, --eval_config F, ...; F:ARG as
  ml_collections takes it), and `defaults`."""
  found = list(defaults)
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if re.fullmatch(r"--?\w*config", name):
      value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
      found.append(value.split(":", 1)[0])
  return [f for f in found if f]


def user_code_failure(error, files):
  """'FILE:LINE: Type: message' of an exception that one of `files` raised, or the error's
  first line."""
  found = user_code_error(error, files)
  if found is None:
    return _first_line(error)
  error, frame = found
  return f"{frame.filename}:{frame.lineno}: {_first_line(error)}"


def load_python_file(path, what, name="user_file"):
  """Execute a Python file (a recipe or sweep file) as a module; any failure to find,
  parse or run it is one UsageError naming the file and the line at fault."""
  if not os.path.isfile(path):
    kind = "is a directory" if os.path.isdir(path) else "no such file"
    raise UsageError(f"{path}: {kind}; expected {what} (a .py file)")
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise UsageError(f"{path}: not a Python file; expected {what}")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UsageError(f"{path}:{e.lineno}: syntax error ({e.msg}); expected {what}") from None
  except Exception as e:  # whatever the user's file raises while it loads
    raise UsageError(f"{path}: fails to load ({_first_line(e)}); expected {what}") from None
  return module


def call_user_function(module, path, function, what):
  """module.function(), with a missing function or one that raises as one UsageError."""
  fn = getattr(module, function, None)
  if not callable(fn):
    raise UsageError(f"{path}: defines no {function}(); expected {what}")
  try:
    return fn()
  except Exception as e:  # the user's code
    raise UsageError(f"{path}: {function}() fails ({_first_line(e)})") from None


# libtpu (installed with the `tpu` extra, for mae_jax.aot) starts with every JAX backend
# and, on a host without TPU chips, writes five lines of errors about the TPU host and
# worker names it cannot find. These describe a single host with no TPU to it; a TPU VM
# keeps whatever its environment says.
NO_TPU_HOST_ENV = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1"}
def quiet_libtpu_without_tpu():
  """Before JAX starts: on a host without TPU chips, tell libtpu so (NO_TPU_HOST_ENV, where
  not set already), so that it adds nothing to a command's stderr."""
  if not has_tpu_chips():
    for key, value in NO_TPU_HOST_ENV.items():
      os.environ.setdefault(key, value)


_FLAG_PROBLEMS = (  # fragments of absl / ml_collections parse errors -> what was expected
    ("invalid literal for int()", "expected an int"),
    ("could not convert string to float", "expected a float"),
    ("Non-boolean argument", "expected true or false"),
    ("is not a dict", "expected a field of it, e.g. --config.optim.base_lr=1e-4"),
    ("as a ConfigDict", "it is a group of fields; set one, e.g. --config.optim.base_lr=1e-4"),
)


def flag_error(error, argv, recipe="configs/default.py"):
  """One line for a bad --config, --config.FIELD or other flag: absl and ml_collections raise
  several kinds of error, some of them multi-line or quoted twice. `recipe` is the file an
  unknown field's message points to."""
  files = recipe_files(argv, [default_recipe(os.path.basename(recipe))])
  if user_code_error(error, files) is not None:  # the recipe file's own code raised it
    return f"a recipe file fails to load: {user_code_failure(error, files)}"
  text = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split())
  if isinstance(error, (KeyError, AttributeError)):  # an unknown --config.FIELD
    key = re.search(r"'(\w+)'", text)
    key = key.group(1) if key else text
    hint = re.search(r'Did you mean "(\w+)"', text)
    flag = next((a.split("=", 1)[0] for a in argv
                 if re.match(rf"--?config\.(\w+\.)*{re.escape(key)}(=|$)", a)), None)
    where = (flag.lstrip("-") if flag else f"config.{key}")
    return (f"{where}: unknown field {key!r}" + (f"; did you mean {hint.group(1)!r}?" if hint
                                                 else f"; see {recipe}"))
  match = re.match(r"flag --(config\.[\w.]+)=(.*?): (.*)", text)
  if match:
    field, value, problem = match.groups()
    expected = next((e for fragment, e in _FLAG_PROBLEMS if fragment in problem), problem)
    return f"{field}: {value!r} is not valid; {expected}"
  errno = re.search(r"\[Errno \d+\].*", text)
  if isinstance(error, OSError) and errno:
    return f"--config: cannot load the recipe: {errno.group(0)}"
  return text
