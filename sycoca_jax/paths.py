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
import threading
import time
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
  """A lease on the workdir: the file `LOCK` names the run that trains there and when it last said so.

  Two runs on one workdir would overwrite each other's checkpoints and log every step twice (or one would crash
  on a checkpoint the other rotated out), so a run takes the lock before anything else and a second run stops
  at once, naming the holder. The holder rewrites its heartbeat every `lease_s / 4` seconds from a thread; a lock
  is taken over, with a log line, when
    - its heartbeat is older than `lease_s` (a run whose hosts are gone: a preempted TPU VM that was recreated,
      a SLURM job requeued onto other nodes), or
    - it names the same scheduler job (SLURM_JOB_ID, the same across a requeue), or
    - it was left by a process of this host that is no longer alive.
  A live run elsewhere keeps its heartbeat fresh, so it is refused at once. Locally the file is created
  exclusively (O_EXCL); on Cloud Storage, which has no exclusive create, it is written then read back, which
  catches all but a near-simultaneous start.
  """

  NAME = "LOCK"
  JOB_VARIABLES = ("SLURM_JOB_ID", "SYCOCA_JOB_ID")  # set by a scheduler, kept across a requeue

  def __init__(self, workdir: epath.PathLike, lease_s: float = 600.0):
    self.path = resolve(workdir) / self.NAME
    self.lease_s = lease_s
    job = next((os.environ[k] for k in self.JOB_VARIABLES if os.environ.get(k)), None)
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "job": job}
    self.held = False
    self._stop = threading.Event()

  def acquire(self) -> "WorkdirLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a stale lock removed, or one that vanished while read, leaves room for a retry
      if self._create():
        return self._start_heartbeat()
      holder = self.holder()
      if holder is None:
        continue
      if _same_run(holder, self.owner):  # left by this process (an earlier run in it that raised): still ours
        return self._start_heartbeat()
      reason = self._takeover_reason(holder)
      if reason:
        logging.warning("Workdir lock %s was held by process %s on %s, %s: taking it over.", self.path,
                        holder.get("pid"), holder.get("host"), reason)
        self.path.unlink(missing_ok=True)
        continue
      age = time.time() - holder.get("heartbeat", time.time())
      raise WorkdirLocked(
          f"{self.path.parent} is in use by process {holder.get('pid')} on host {holder.get('host')} (lock file "
          f"{self.path}, heartbeat {age:.0f} s ago). Wait for that run to end or use another --workdir; a lock "
          f"whose heartbeat is older than {self.lease_s:.0f} s is taken over.")
    raise WorkdirLocked(f"Could not take the workdir lock {self.path}: it keeps changing hands.")

  def _takeover_reason(self, holder: dict) -> Optional[str]:
    age = time.time() - holder.get("heartbeat", 0.0)  # a lock without heartbeat (older format): stale
    if age > self.lease_s:
      return f"whose heartbeat is {age:.0f} s old (lease {self.lease_s:.0f} s)"
    if self.owner["job"] and holder.get("job") == self.owner["job"]:
      return f"of this job ({self.owner['job']}), requeued"
    if holder.get("host") == self.owner["host"] and not _process_alive(holder.get("pid", -1)):
      return "which is gone"
    return None

  def holder(self) -> Optional[dict]:
    try:
      holder = json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):
      return None
    return holder if isinstance(holder, dict) else None

  def release(self) -> None:
    self._stop.set()
    if not self.held:  # released already (e.g. at exit, after the run released it)
      return
    holder = self.holder()
    if holder is not None and _same_run(holder, self.owner):
      self.path.unlink(missing_ok=True)
    self.held = False

  def _text(self) -> str:
    return json.dumps(dict(self.owner, heartbeat=time.time()))

  def _start_heartbeat(self) -> "WorkdirLock":
    self.held = True
    self._stop.clear()
    threading.Thread(target=self._beat, daemon=True, name="workdir-lease").start()
    return self

  def _beat(self):
    while not self._stop.wait(self.lease_s / 4):
      holder = self.holder()
      if holder is not None and not _same_run(holder, self.owner):
        logging.error("Workdir lock %s was taken over by process %s on %s: two runs may now share the workdir.",
                      self.path, holder.get("pid"), holder.get("host"))
        return
      try:
        write_atomic(self.path, self._text())
      except Exception as e:  # pylint: disable=broad-except  (a storage hiccup: the next beat tries again)
        logging.warning("Could not renew the workdir lock %s: %s", self.path, e)

  def _create(self) -> bool:
    text = self._text()
    if is_url(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      holder = self.holder()
      return holder is not None and _same_run(holder, self.owner)
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    return True


def _same_run(a: dict, b: dict) -> bool:
  return a.get("host") == b.get("host") and a.get("pid") == b.get("pid")


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
