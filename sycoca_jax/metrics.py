"""Metric writers: TensorBoard event files and a JSON-lines file in the workdir; only process 0 writes.

metrics.jsonl has one JSON object per write: {"step": k, "<name>": value, ...}, easy to read from scripts:
  metrics.read_jsonl(workdir)       # or [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")] locally
On an object store the rows are uploaded in parts, metrics.jsonl.parts/<n>.jsonl, which read_jsonl joins.

The workdir may be a gs:// URL (sycoca_jax.paths): metrics.jsonl goes through etils.epath, the TensorBoard
writer through TensorFlow's file system, which speaks gs:// itself.
"""

import json
import logging as logging_std
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface
from etils import epath

from sycoca_jax import paths


class JsonlWriter(interface.MetricWriter):
  """Scalars (and texts) as JSON lines: metrics.jsonl locally, numbered part objects on an object store.

  Locally each row is appended and flushed at once. An object store (gs://) has no append: flushing one growing
  object would upload the whole file again at every row, a cost that grows with the square of the run's length.
  There rows are kept in memory and uploaded as a new object, metrics.jsonl.parts/<n>.jsonl, every `flush_s`
  seconds and at each `flush()` (the trainer flushes before each checkpoint, so no row of a checkpointed step is
  lost with the process); `read_jsonl` reads the parts in order as one file.

  With `resume_step`, rows of later steps are dropped first: a run that was killed after its last checkpoint
  logged steps that the resumed run logs again, and each step should appear once.
  """

  def __init__(self, path: epath.PathLike, resume_step: Optional[int] = None, *,
               object_store: Optional[bool] = None, flush_s: float = 60.0):
    path = paths.resolve(path)
    self._parts = paths.is_url(path) if object_store is None else object_store
    if resume_step is not None:
      for file in _files(path):
        _drop_rows_after(file, resume_step)
    if self._parts:
      self._folder = _parts_folder(path)
      self._folder.mkdir(parents=True, exist_ok=True)
      self._next_part = 1 + max([int(f.stem) for f in _files(path) if f.stem.isdigit()] or [-1])
      self._rows: list[str] = []
      self._flush_s, self._flushed_at = flush_s, time.time()
    else:
      self._file = path.open("a")

  def _write(self, row: dict) -> None:
    line = json.dumps(row) + "\n"
    if not self._parts:
      self._file.write(line)
      self._file.flush()
      return
    self._rows.append(line)
    if time.time() - self._flushed_at >= self._flush_s:
      self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._write({"step": int(step)} | {k: float(np.asarray(v)) for k, v in scalars.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._write({"step": int(step)} | dict(texts))

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_hparams(self, hparams):
    self._write({"hparams": {k: str(v) for k, v in hparams.items()}})

  def flush(self):
    if not self._parts:
      self._file.flush()
      return
    if self._rows:  # one new object per flush; none is ever rewritten while the run goes on
      (self._folder / f"{self._next_part:06d}.jsonl").write_text("".join(self._rows))
      self._next_part += 1
      self._rows = []
    self._flushed_at = time.time()

  def close(self):
    self.flush()
    if not self._parts:
      self._file.close()


def _parts_folder(path: epath.Path) -> epath.Path:
  return path.parent / (path.name + ".parts")


def _files(path: epath.Path) -> list[epath.Path]:
  """metrics.jsonl (if any), then its parts in order: what `read_jsonl` reads, as one file."""
  folder = _parts_folder(path)
  parts = sorted(folder.glob("*.jsonl"), key=lambda f: f.name) if folder.is_dir() else []
  return ([path] if path.exists() else []) + parts


def _drop_rows_after(path: epath.Path, step: int) -> None:
  """Rewrites a metrics file without the rows of steps after `step` (and, from step 0, without the hparams row,
  which a fresh start writes again); a part left with no row is removed."""
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  keep = []
  for line in lines:
    row = json.loads(line)
    if row["step"] <= step if "step" in row else step > 0:
      keep.append(line)
  if len(keep) != len(lines):
    if keep or not path.parent.name.endswith(".parts"):
      paths.write_atomic(path, "".join(line + "\n" for line in keep))
    else:
      path.unlink()


def create_writer(workdir: epath.PathLike, resume_step: Optional[int] = None) -> metric_writers.MetricWriter:
  """TensorBoard + JSON lines + the log on process 0; only the log on the others.

  A training run passes the step it starts from (0 for a fresh start): metrics.jsonl keeps no rows after it.
  """
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True)
  workdir = paths.resolve(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(str(workdir), asynchronous=True),
      JsonlWriter(workdir / "metrics.jsonl", resume_step),
  ])


def read_jsonl(workdir: epath.PathLike) -> list[dict[str, Any]]:
  """The rows of the workdir's metrics.jsonl (and of its parts, on an object store), in the order written."""
  path = paths.resolve(workdir) / "metrics.jsonl"
  files = _files(path)
  if not files:
    raise FileNotFoundError(f"No metrics in {path.parent}: neither {path.name} nor {_parts_folder(path).name}/.")
  return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


class QuietLibraries(logging_std.Filter):
  """Keeps the log to what a person reads: orbax, grain and etils log every file they touch at INFO.

  Install it with `absl.logging.get_absl_handler().addFilter(QuietLibraries())`.
  """

  def filter(self, record):
    noisy = ("/orbax/", "/grain/", "/etils/")
    return record.levelno >= logging_std.WARNING or not any(n in record.pathname for n in noisy)
