"""Metric writers: TensorBoard event files and a JSON-lines file in the workdir; only process 0 writes.

metrics.jsonl has one JSON object per write: {"step": k, "<name>": value, ...}, easy to read from scripts:
  metrics.read_jsonl(workdir)       # or [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")] locally

The workdir may be a gs:// URL (sycoca_jax.paths): metrics.jsonl goes through etils.epath, the TensorBoard
writer through TensorFlow's file system, which speaks gs:// itself.
"""

import json
import logging as logging_std
from typing import Any, Mapping, Optional

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface
from etils import epath

from sycoca_jax import paths


class JsonlWriter(interface.MetricWriter):
  """Scalars (and texts) as JSON lines, appended and flushed at each write (a local file or a gs:// object).

  With `resume_step`, rows of later steps are dropped first: a run that was killed after its last checkpoint
  logged steps that the resumed run logs again, and each step should appear once.
  """

  def __init__(self, path: epath.PathLike, resume_step: Optional[int] = None):
    path = paths.resolve(path)
    if resume_step is not None and path.exists():
      _drop_rows_after(path, resume_step)
    self._file = path.open("a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)} | {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._file.write(json.dumps({"step": int(step)} | dict(texts)) + "\n")
    self._file.flush()

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
    self._file.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")
    self._file.flush()

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def _drop_rows_after(path: epath.Path, step: int) -> None:
  """Rewrites metrics.jsonl without the rows of steps after `step` (and, from step 0, without the hparams row,
  which a fresh start writes again)."""
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  keep = []
  for line in lines:
    row = json.loads(line)
    if row["step"] <= step if "step" in row else step > 0:
      keep.append(line)
  if len(keep) != len(lines):
    paths.write_atomic(path, "".join(line + "\n" for line in keep))


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
  text = (paths.resolve(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


class QuietLibraries(logging_std.Filter):
  """Keeps the log to what a person reads: orbax, grain and etils log every file they touch at INFO.

  Install it with `absl.logging.get_absl_handler().addFilter(QuietLibraries())`.
  """

  def filter(self, record):
    noisy = ("/orbax/", "/grain/", "/etils/")
    return record.levelno >= logging_std.WARNING or not any(n in record.pathname for n in noisy)
