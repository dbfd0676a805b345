"""Metric writers: TensorBoard event files and a JSON-lines file in the workdir; only process 0 writes.

metrics.jsonl has one JSON object per write: {"step": k, "<name>": value, ...}, easy to read from scripts:
  metrics.read_jsonl(workdir)       # or [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")] locally
On an object store the rows are uploaded in parts, metrics.jsonl.parts/<n>.jsonl, which read_jsonl joins.

The TensorBoard events of a local workdir are written here (`EventFileWriter`) from TensorBoard's own protocol
buffers, without TensorFlow: importing TensorFlow costs every training process seconds before its first step.
A gs:// workdir (sycoca_jax.paths) has no append, so its events go through clu's writer and TensorFlow's file
system, which speaks gs:// itself; metrics.jsonl goes through etils.epath.
"""

import abc
import io
import json
import logging as logging_std
import os
import socket
import struct
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from sycoca_jax import paths


class MetricWriter(abc.ABC):
  """What the trainer and the evaluators write through (clu.metric_writers' interface, the parts used here)."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Scalars of one step: {name: number or 0-d array}."""

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """{name: [N, H, W, C] or [H, W, C] images}, float in [0, 1] or uint8; C is 1, 3 or 4."""

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    pass

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self.flush()


class LoggingWriter(MetricWriter):
  """Scalars and texts to the log (absl INFO), as "[step] name = value, ..."."""

  def write_scalars(self, step, scalars):
    logging.info("[%d] %s", step, ", ".join(f"{k} = {float(np.asarray(v)):.6g}" for k, v in sorted(scalars.items())))

  def write_texts(self, step, texts):
    for k, v in texts.items():
      logging.info("[%d] %s: %s", step, k, v)

  def write_hparams(self, hparams):
    logging.info("[hparams] %s", ", ".join(f"{k} = {v}" for k, v in sorted(hparams.items())))


class MultiWriter(MetricWriter):
  """Writes everything to each of `writers`."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_texts(self, step, texts):
    for w in self.writers:
      w.write_texts(step, texts)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def _masked_crc32c(data: bytes) -> int:
  """The TFRecord framing's checksum: CRC-32C, rotated and offset (so that a CRC of CRCs is not trivial)."""
  try:
    import google_crc32c  # pylint: disable=g-import-not-at-top  (C implementation; google-cloud-storage's)
    crc = google_crc32c.value(data)
  except ImportError:
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow  # pylint: disable=g-import-not-at-top
    crc = pywrap_tensorflow.crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _png(image: np.ndarray) -> bytes:
  import PIL.Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


class EventFileWriter(MetricWriter):
  """TensorBoard events in a local folder, as TFRecords of `Event` protos, without TensorFlow.

  Scalars are `simple_value`s, texts go to the text plugin, hparams to the hparams plugin, and each image entry
  [N, H, W, C] becomes one PNG of the N images side by side. Records are buffered and appended at `flush()`.
  """

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    self._path = os.path.join(logdir, name)
    self._pending: list[bytes] = []
    self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    self.flush()

  def _add(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._pending.append(header + struct.pack("<I", _masked_crc32c(header)) + data +
                         struct.pack("<I", _masked_crc32c(data)))

  def _summary(self, step: int, values) -> None:
    summary = self._summary_pb2.Summary(value=values)
    self._add(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_scalars(self, step, scalars):
    value = self._summary_pb2.Summary.Value
    self._summary(step, [value(tag=k, simple_value=float(np.asarray(v))) for k, v in scalars.items()])

  def write_images(self, step, images):
    values = []
    for tag, batch in images.items():
      batch = np.asarray(batch)
      batch = batch[None] if batch.ndim == 3 else batch
      if batch.size == 0:
        continue
      if batch.dtype != np.uint8:
        batch = np.round(np.clip(batch.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
      strip = np.concatenate(list(batch), axis=1)  # [H, N * W, C]
      image = self._summary_pb2.Summary.Image(height=strip.shape[0], width=strip.shape[1],
                                               colorspace=strip.shape[2], encoded_image_string=_png(strip))
      values.append(self._summary_pb2.Summary.Value(tag=tag, image=image))
    if values:
      self._summary(step, values)

  def write_texts(self, step, texts):
    from tensorboard.plugins.text import metadata as text_metadata  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2  # pylint: disable=g-import-not-at-top
    values = []
    for tag, text in texts.items():
      tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[str(text).encode()],
                                      tensor_shape=tensor_shape_pb2.TensorShapeProto())
      values.append(self._summary_pb2.Summary.Value(
          tag=tag, metadata=text_metadata.create_summary_metadata(display_name=None, description=""), tensor=tensor))
    self._summary(step, values)

  def write_hparams(self, hparams):
    from tensorboard.plugins.hparams import summary_v2  # pylint: disable=g-import-not-at-top
    # TensorBoard's hparams take numbers, booleans and strings; anything else is shown as its text.
    plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    self._add(self._event_pb2.Event(wall_time=time.time(), summary=summary_v2.hparams_pb(plain)))

  def flush(self):
    if self._pending:
      with open(self._path, "ab") as f:
        f.write(b"".join(self._pending))
      self._pending = []


class JsonlWriter(MetricWriter):
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


def create_writer(workdir: epath.PathLike, resume_step: Optional[int] = None) -> MetricWriter:
  """TensorBoard + JSON lines + the log on process 0; only the log on the others.

  A training run passes the step it starts from (0 for a fresh start): metrics.jsonl keeps no rows after it.
  """
  if jax.process_index() != 0:
    return LoggingWriter()
  workdir = paths.resolve(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if paths.is_url(workdir):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow, which speaks gs://)
    tensorboard = metric_writers.create_default_writer(str(workdir), asynchronous=True)
  else:
    tensorboard = MultiWriter([EventFileWriter(os.fspath(workdir)), LoggingWriter()])
  return MultiWriter([tensorboard, JsonlWriter(workdir / "metrics.jsonl", resume_step)])


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
