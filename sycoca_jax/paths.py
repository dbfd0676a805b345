"""Workdir paths: local folders and gs:// buckets behind one abstraction, etils.epath (which orbax uses too).

Everything written to or read from a workdir (checkpoints, input-pipeline state, metrics.jsonl, evaluator
outputs, converted weights, the checkpoints inference and evaluation load) goes through here. os.path.abspath,
os.makedirs and open know nothing of URLs: given gs://bucket/run they make a local folder ./gs:/bucket/run on
every host, so a pod would keep one partial copy of the run per host and the bucket would stay empty.

  path = paths.resolve(workdir)                 # epath.Path; gs:// as it is, a local path made absolute
  (path / "data_state").mkdir(parents=True, exist_ok=True)
  paths.write_atomic(path / "data_state" / "3" / "process_0.json", text)

On Cloud Storage, epath reaches gs:// through TensorFlow's GCS client (installed here) and orbax writes its
arrays through TensorStore's; both find credentials the usual way (the VM's service account on a TPU VM,
`gcloud auth application-default login` elsewhere).
"""

import io
import os
import re

from etils import epath

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: epath.PathLike) -> bool:
  """True for gs://, s3://, ... paths: they must never be resolved against the current directory."""
  return bool(_URL.match(os.fspath(path)))


def resolve(path: epath.PathLike) -> epath.Path:
  """`path` as an epath.Path: a URL untouched, a local path with ~ expanded and made absolute (orbax needs it)."""
  if is_url(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_atomic(path: epath.PathLike, text: str) -> None:
  """Writes `text` to `path` whole or not at all: a temporary file, then a rename over the target.

  Local files are also fsynced before the rename, so a crash of the machine never leaves an empty file; on
  Cloud Storage an object only appears once its upload completes.
  """
  path = resolve(path)
  tmp = path.parent / (path.name + ".tmp")
  with tmp.open("w") as f:
    f.write(text)
    f.flush()
    try:
      os.fsync(f.fileno())
    except (AttributeError, io.UnsupportedOperation, OSError):  # not a local file: nothing to sync
      pass
  tmp.replace(path)
