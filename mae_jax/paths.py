"""The one path layer: every path a user gives (workdir, data, weights) is local or gs://,
an etils `epath.Path` as in Orbax and TFDS, gs:// through gcsfs (`configure`). Cloud
Storage has no directories and no rename: an object is written whole or not at all.
"""
import functools
import logging
import os
import re

import fsspec
from etils import epath


def configure():
  """Set up gs:// for this process before its first path (every command does; a library
  user calls it once): epath through gcsfs (EPATH_USE_TF=false: TensorFlow is not a
  dependency), listings never cached (TensorStore and other processes write the same
  workdir), MAE_JAX_GCS_TIMEOUT_S seconds a request (default 60), and gcsfs's traceback
  of a failed request silenced (the caller reports the error in one line)."""
  os.environ.setdefault("EPATH_USE_TF", "false")
  gcs = fsspec.config.conf.setdefault("gcs", {})
  gcs.setdefault("use_listings_cache", False)
  gcs.setdefault("requests_timeout", float(os.environ.get("MAE_JAX_GCS_TIMEOUT_S", "60")))
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


class PathError(ValueError):
  """A path that cannot name a place: gs:// without a bucket, a malformed bucket name."""


def is_gcs(path):
  return os.fspath(path).startswith("gs://")


def bucket(path):
  """The bucket of a gs:// path; PathError naming the path if it has none or a bad one."""
  rest = os.fspath(path)[len("gs://"):]
  name = rest.split("/", 1)[0]
  if not name:
    raise PathError(f"{path}: no bucket; a Cloud Storage path is gs://BUCKET/PATH")
  if not _BUCKET.fullmatch(name):
    raise PathError(f"{path}: {name!r} is not a valid bucket name (3-222 characters: "
                    "lower-case letters, digits, '-', '_' and '.')")
  return name


def resolve(path):
  """An epath.Path for `path`: gs:// as given (its bucket checked), local ones absolute."""
  text = os.fspath(path)
  if is_gcs(text):
    bucket(text)
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))


def join(path, *parts):
  """`path`/`parts` as a string (gs:// kept; a relative local path stays relative)."""
  if is_gcs(path):
    return os.fspath(resolve(path).joinpath(*parts))
  return os.path.join(os.fspath(path), *parts)


def absolute(path):
  """`path` as a string: gs:// as given, a local path made absolute (what Orbax needs)."""
  return os.fspath(resolve(path))


def exists(path):
  return resolve(path).exists()


def isdir(path):
  return resolve(path).is_dir()


def isfile(path):
  p = resolve(path)
  return p.exists() and not p.is_dir()


def listdir(path):
  """Names in a directory (on GCS: below the prefix), sorted."""
  return sorted(p.name for p in resolve(path).iterdir())


def makedirs(path):
  resolve(path).mkdir(parents=True, exist_ok=True)


def read_text(path):
  return resolve(path).read_text()


def write_probe(directory, tag=""):
  """Write and delete a small object in `directory` (local or gs://): what a missing bucket,
  missing credentials, an unreachable server or an unwritable folder raises, it raises,
  before a command starts its work."""
  probe = join(directory, f".write-probe-{tag}{os.getpid()}")
  write_atomic(probe, b"")
  resolve(probe).unlink()


def write_atomic(path, data):
  """Write `data` (str or bytes) to `path` so that a reader sees the old or the new
  contents, never a part."""
  p = resolve(path)
  mode = "wb" if isinstance(data, bytes) else "w"
  if is_gcs(p):
    with p.open(mode) as f:
      f.write(data)
    return
  tmp = p.with_name(p.name + f".tmp-{os.getpid()}")
  with tmp.open(mode) as f:
    f.write(data)
  os.replace(tmp, p)


def upload(local_file, path):
  """Copy the local file `local_file` to the gs:// `path`, streamed: the object appears
  whole when the upload completes, or not at all."""
  gcs_filesystem().put_file(local_file, os.fspath(resolve(path))[len("gs://"):])


def create_new(path, data):
  """Write `data` (str) to `path` only if nothing is there: True if written, False if
  `path` exists. One atomic step on both sides (O_EXCL locally, the ifGenerationMatch=0
  precondition on Cloud Storage), so of two callers racing for one path, one wins."""
  p = resolve(path)
  if is_gcs(p):
    try:
      gcs_filesystem().pipe_file(os.fspath(p)[len("gs://"):], data.encode(), mode="create")
    except FileExistsError:
      return False
    return True
  try:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(data)
  return True


def read_generation(path):
  """(contents as bytes, generation) of a gs:// object, from one request: the generation
  names exactly the contents read (Cloud Storage gives every write a new one)."""
  bucket_name, key = _bucket_and_key(path)
  headers, contents = gcs_filesystem().call("GET", "b/{}/o/{}", bucket_name, key, alt="media")
  return contents, int(headers["X-Goog-Generation"])


def replace_generation(path, data, generation):
  """Write `data` (str) to the gs:// `path` only if its object is still at `generation`
  (the ifGenerationMatch precondition, checked by the server): True if written, False if
  it was replaced or removed meanwhile. Of callers racing to replace one generation, one
  wins. gcsfs writes with no precondition but "absent" (mode="create"), so this goes
  through the Cloud Storage client gcsfs itself depends on."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  bucket_name, key = _bucket_and_key(path)
  try:
    _storage_client().bucket(bucket_name).blob(key).upload_from_string(
        data.encode(), if_generation_match=generation)
  except exceptions.PreconditionFailed:
    return False
  return True


@functools.cache
def _storage_client():
  """One google.cloud.storage client (credentials from the environment, as gcsfs's; the
  emulator's STORAGE_EMULATOR_HOST honoured)."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  return storage.Client()


def _bucket_and_key(path):
  rest = os.fspath(resolve(path))[len("gs://"):]
  bucket_name, _, key = rest.partition("/")
  return bucket_name, key


def walk_files(root):
  """{path relative to `root`: size} of every file below `root`, from one listing on GCS
  (no object is read) or os.walk + stat locally."""
  root_p = resolve(root)
  if not is_gcs(root_p):
    return {os.path.relpath(os.path.join(d, n), root_p): os.path.getsize(os.path.join(d, n))
            for d, _, names in os.walk(root_p) for n in names}
  return {rel: int(info["size"]) for rel, info in _gcs_objects(root_p).items()}


def gcs_checksums(root):
  """{path relative to `root`: base64 CRC-32C} as Cloud Storage computed it on upload
  (returned by a listing: no object is downloaded)."""
  return {rel: info.get("crc32c") for rel, info in _gcs_objects(root).items()}


def _gcs_objects(root):
  """{path relative to the gs:// `root`: gcsfs's info} of every object below it."""
  prefix = os.fspath(resolve(root))[len("gs://"):].rstrip("/") + "/"
  return {name[len(prefix):]: info
          for name, info in gcs_filesystem().find(prefix, detail=True).items()
          if info.get("type") != "directory" and not name.endswith("/")}


def gcs_filesystem():
  return fsspec.filesystem("gcs")


