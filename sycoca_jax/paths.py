"""Workdir and data paths: local folders and gs:// buckets behind one abstraction, etils.epath (as orbax uses).

Everything written to or read from a workdir (checkpoints, input-pipeline state, metrics.jsonl, evaluator
outputs, converted weights, the checkpoints inference and evaluation load) goes through here. os.path.abspath,
os.makedirs and open know nothing of URLs: given gs://bucket/run they make a local folder ./gs:/bucket/run on
every host, so a pod would keep one partial copy of the run per host and the bucket would stay empty.

  path = paths.resolve(workdir)                 # epath.Path; gs:// as it is, a local path made absolute
  (path / "data_state").mkdir(parents=True, exist_ok=True)
  paths.write_atomic(path / "data_state" / "3" / "process_0.json", text)
  paths.glob("gs://bucket/cc12m/*.array_record")  # training data: sorted matches, local or in a bucket

On Cloud Storage, epath reaches gs:// through TensorFlow's GCS client (installed here) and orbax writes its
arrays through TensorStore's; both find credentials the usual way (the VM's service account on a TPU VM,
`gcloud auth application-default login` elsewhere).
"""

import io
import json
import os
import re
import socket
from typing import Optional

from absl import logging
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


def glob(pattern: epath.PathLike) -> list[str]:
  """Files matching `pattern` (wildcards * ? [...] in any component after the first), sorted; local or a URL.

  The part before the first wildcard is the folder listed, the rest the pattern epath matches under it, so
  'gs://bucket/cc12m/train-*.array_record' lists one bucket prefix rather than the bucket.
  """
  parts = os.fspath(pattern).split("/")
  fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
  if fixed == len(parts):  # no wildcard: the file itself, if it exists
    path = resolve(pattern)
    return [os.fspath(path)] if path.exists() else []
  root = resolve("/".join(parts[:fixed]) or ("/" if os.fspath(pattern).startswith("/") else "."))
  return sorted(os.fspath(p) for p in root.glob("/".join(parts[fixed:])))


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


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


class WorkdirLock:
  """A lock file in the workdir, `LOCK`, holding the host and PID of the run that trains there.

  Two runs on one workdir would overwrite each other's checkpoints and log every step twice (or one would crash
  on a checkpoint the other rotated out), so a run takes the lock before anything else and a second run stops
  at once, naming the holder. A lock left by a process that died on this host is taken over, with a log line;
  one from another host cannot be checked and must be deleted by hand if that run is gone. Locally the file is
  created exclusively (O_EXCL); on Cloud Storage, which has no exclusive create, it is written then read back,
  which catches all but a near-simultaneous start.
  """

  NAME = "LOCK"

  def __init__(self, workdir: epath.PathLike):
    self.path = resolve(workdir) / self.NAME
    self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
    self.held = False

  def acquire(self) -> "WorkdirLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a stale lock removed, or one that vanished while read, leaves room for a retry
      if self._create():
        self.held = True
        return self
      holder = self.holder()
      if holder is None:
        continue
      if holder == self.owner:  # left by this process (an earlier run in it that raised): still ours
        self.held = True
        return self
      if holder.get("host") == self.owner["host"] and not _process_alive(holder.get("pid", -1)):
        logging.warning("Workdir lock %s was left by process %s on %s, which is gone: taking it over.", self.path,
                        holder.get("pid"), holder.get("host"))
        self.path.unlink(missing_ok=True)
        continue
      raise WorkdirLocked(
          f"{self.path.parent} is in use by process {holder.get('pid')} on host {holder.get('host')} (lock file "
          f"{self.path}). Wait for that run to end or use another --workdir; if it is gone, delete the lock file.")
    raise WorkdirLocked(f"Could not take the workdir lock {self.path}: it keeps changing hands.")

  def holder(self) -> Optional[dict]:
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):
      return None

  def release(self) -> None:
    if self.held and self.holder() == self.owner:
      self.path.unlink(missing_ok=True)
    self.held = False

  def _create(self) -> bool:
    text = json.dumps(self.owner)
    if is_url(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      return self.holder() == self.owner
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    return True


def _process_alive(pid: int) -> bool:
  if not isinstance(pid, int) or pid <= 0:  # kill(0 or -1, ...) would address a whole group of processes
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  except OverflowError:
    return False
  return True
