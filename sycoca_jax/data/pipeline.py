"""Input pipelines: deterministic, resumable training batches and evaluation splits.

Training (`build_train_iterator`) is a grain dataset graph, then batches cut in this process:

  order = range(len(source)).shuffle(seed).repeat()   one global example order, reshuffled every epoch
  range(first chunk, ...).map(make_chunk)             examples k = K c ... K c + K - 1 of this process's stream,
                                                      k -> (g(k), order[g(k)]): read, decode, crop, pick +
                                                      tokenise a caption; an unusable record replaced by a
                                                      seeded substitute in its own row; stacked as uint8
    .to_iter_dataset(threads)                         parallel reads, prefetch
    .mp_prefetch(workers)                             the above in worker processes, chunk c in worker c % W
  TrainIterator                                       counts the skipped records by reason, cuts batches of
                                                      global_batch_size // process_count: stream indices
                                                      [j b, (j + 1) b), whole chunks (one chunk goes as is)
  DevicePrefetcher (data/prefetch.py)                 batches on the devices ahead of the step (the trainer)

g(k) maps this process's k-th example to its position in the global stream: process p of P takes positions
[p b, (p + 1) b) of each global batch of B = P b. So the global batch is the same whatever the number of
processes (a run on 2 hosts sees exactly the batches of a run on 1), and processes read disjoint examples.
Every random choice of an example (crop, flip, caption, a substitute) comes from a generator seeded by (seed,
epoch, record id) or (seed, position), and the order by grain's index shuffle, so the stream is a pure function
of the seed and the iterator state is a few integers: `it.get_state()` / `it.set_state(state)` resume exactly.

Decoding runs in `data_config.num_workers` worker processes (grain's mp_prefetch), since threads in one
process share one interpreter lock and a pod host has to feed its chips several hundred examples/s at 288 px
(README, "Feeding a pod host"). Worker w makes chunks w, w + W, w + 2W, ... and the main process takes them in
turn, so the stream is the same for any number of workers, 0 included. Counting and batching run in the main
process, in stream order: the skip counts are exact, and the state is the count of examples taken, which
depends neither on W nor on the chunk size K (a checkpoint written with 8 workers resumes with 2).

The batch contract (this process's slice of the global batch; b = global_batch_size / process_count):
  'image'       uint8   [b, S, S, 3], pixels; the train step normalises them on the device (sycoca_jax.pixels)
  'text'        int32   [b, L]  bos, ids, eos, then pad 0 (L = data_config.max_len)
  'example_id'  int32   [b]     the record id in the source (the scene index for the built-in scenes)

Examples that can not be used (corrupt or truncated image bytes, an unsupported pixel format, a missing file,
no non-empty caption) are replaced and counted; `it.stats` gives the counts for logging.

Evaluation (`load_eval_split`) returns an `EvalSplit`: annotations up front (captions, labels, scene graphs,
VQA pairs), images decoded on demand in padded, masked batches that every process steps through together.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import functools
import io
import math
import multiprocessing
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import connection as mp_connection

import grain
import ml_collections
import numpy as np
from absl import flags
from absl import logging
from PIL import Image

from sycoca_jax import paths
from sycoca_jax.data import scenes as scenes_lib
from sycoca_jax.data import sources as sources_lib
from sycoca_jax.data import tokenizers as tokenizers_lib
from sycoca_jax.data.sources import BadExample



def default_data_config() -> ml_collections.ConfigDict:
  """Data config with the built-in scenes defaults; configs start from it and override what they need.

  Keys:
    name            "scenes" | "webdataset_array_record" | "tfds" | "coco_json"
    image_size      S, the side of the square images the model sees
    tokenizer       registered tokenizer name: "scenes_words" | "clip_bpe" | "sentencepiece"
    tokenizer_path  model file for "sentencepiece" (unused otherwise)
    max_len         L, token ids per caption, bos and eos included (32 tiny, 76 CoCa-Base)
    seed            what the data is: the scenes world (scene i of a split is a function of seed, split, i).
                    Order and augmentation follow the `seed` given to build_train_iterator.
    split           training split name of the source
    crop_scale      random resized crop: range of the crop's area as a fraction of the image's
    crop_ratio      random resized crop: range of the crop's aspect ratio
    flip            random horizontal flip; swaps the words left/right in the caption. Off by default
    num_workers     processes that read and decode (grain's mp_prefetch). -1: automatic, 0 for the built-in
                    scenes and for real data enough for the host's need at target_steps_per_sec from a rate
                    measured on its first examples, within the cores, memory and /dev/shm
                    (`resolve_num_workers`); 0: decode in this process, with threads
    target_steps_per_sec  the step rate the automatic worker count provisions for (8: above the README's
                    v5e-64 estimate of 6.8)
    num_threads     read threads per process (in each worker when there are workers); -1: 16 for data in a
                    bucket (gs://: reads wait on the network; each chunk's records read together), else 2
                    (chunks made at once)
    device_prefetch batches put on the devices ahead of the step (data/prefetch.py)
    prefetch_buffer_size  examples read ahead, shared out among the workers
    max_consecutive_skips fail (naming the last reason) after this many unusable examples in a row
    scenes          num_train (0: unbounded), num_captions, min_objects, max_objects, backgrounds (kinds drawn,
                    repeats weight them; scenes.BACKGROUNDS), hard_negatives (scenes.NEGATIVE_KINDS: each
                    training caption comes with a false twin for loss.hard_negative_weight's term), twins
                    (training batches of scene pairs that differ in one object's kind, each image with a
                    caption false of the other: scenes.twin_scene)
    path            webdataset_array_record: glob of .array_record files (local or gs://, sycoca_jax.paths);
                    coco_json: the annotation JSON
    image_dir       coco_json: folder the JSON's image paths are relative to
    eval_path       webdataset_array_record: glob of held-out .array_record files for load_eval_split
    tfds_name       tfds: dataset name, e.g. "coco_captions" (Karpathy splits) or "imagenet2012"
    data_dir        tfds: data_dir ("" for TFDS' default)
  """
  return ml_collections.ConfigDict({
      "name": "scenes",
      "image_size": 64,
      "tokenizer": "scenes_words",
      "tokenizer_path": "",
      "max_len": 32,
      "seed": 0,
      "split": "train",
      "crop_scale": (0.9, 1.0),  # open_clip's default for CLIP training
      "crop_ratio": (3 / 4, 4 / 3),
      "flip": False,  # captions say left and right
      "num_workers": -1,
      "target_steps_per_sec": 8.0,
      "num_threads": -1,
      "device_prefetch": 2,
      "prefetch_buffer_size": 64,
      "max_consecutive_skips": 1000,
      "scenes": {"num_train": 0, "num_captions": 5, "min_objects": 1, "max_objects": 4,
                 "backgrounds": scenes_lib.BACKGROUNDS, "hard_negatives": (), "twins": False},
      "path": "",
      "image_dir": "",
      "eval_path": "",
      "tfds_name": "",
      "data_dir": "",
  })


def tokenizer_from_config(data_config) -> tokenizers_lib.Tokenizer:
  kw = {"max_len": data_config.max_len}
  if data_config.get("tokenizer_path"):
    kw["path"] = data_config.tokenizer_path
  return tokenizers_lib.get_tokenizer(data_config.tokenizer, **kw)


# ------------------------------------------------------------------------------------------------ images


_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL image as 8-bit RGB, without silent value errors.

  16-bit greyscale is rescaled (PIL's own convert clips everything above 255 to white); transparency is
  composited over white (the colour under a transparent pixel is arbitrary, often black); palette, grey,
  CMYK and YCbCr go through PIL's conversions. Float images carry no known range and are refused.
  """
  if image.mode == "RGB":
    return image
  if image.mode in _SIXTEEN_BIT_GREY:
    grey = np.asarray(image, np.float32) / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
  if image.mode == "F":
    raise BadExample("unsupported_image_mode", "floating-point pixels of unknown range")
  if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def decode_image(data: bytes, min_side: int = 0) -> Image.Image:
  """Encoded bytes -> RGB image; raises BadExample for corrupt, truncated or unreadable data.

  min_side: lets the JPEG decoder skip resolution the crop will not use (DCT scaling, 2-8x faster decodes of
  web-sized photos); the decoded image keeps at least this many pixels on its shorter side.
  """
  try:
    image = Image.open(io.BytesIO(data))
    if min_side and image.format == "JPEG":
      image.draft("RGB", (min_side, min_side))
    image.load()  # decode now, so that truncation surfaces here rather than in a later transform
  except Exception as e:  # pylint: disable=broad-except  (malformed files raise many types inside PIL)
    raise BadExample("corrupt_image", f"{type(e).__name__}: {e}") from e
  return to_rgb(image)


def load_image(record: dict, min_side: int = 0) -> Image.Image:
  """A source record's image, whichever of 'image' (uint8 array), 'image_bytes' or 'image_path' it has."""
  if "image" in record:
    array = np.asarray(record["image"])
    if array.ndim == 2:
      array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
      raise BadExample("unsupported_image_mode", f"array of shape {array.shape} and dtype {array.dtype}")
    return to_rgb(Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array))
  if "image_path" in record:
    try:
      with paths.resolve(record["image_path"]).open("rb") as f:
        data = f.read()
    except OSError as e:
      raise BadExample("missing_file", record["image_path"]) from e
    return decode_image(data, min_side)
  return decode_image(record["image_bytes"], min_side)


def random_resized_crop(image: Image.Image, rng: np.random.Generator, size: int,
                        scale: Sequence[float], ratio: Sequence[float]) -> Image.Image:
  """Inception-style crop (area fraction in `scale`, aspect ratio in `ratio`), resized to size x size.

  Like torchvision's RandomResizedCrop: ten tries at a crop that fits, else the largest central crop whose
  aspect ratio is inside `ratio`.
  """
  w, h = image.size
  log_ratio = np.log(ratio)
  for _ in range(10):
    area = w * h * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      x0, y0 = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
      break
  else:
    aspect = min(max(w / h, ratio[0]), ratio[1])
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
  if (cw, ch) == (w, h) == (size, size):
    return image
  return image.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=3.0)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
  """Evaluation view: shorter side resized to `size`, then the central size x size square."""
  w, h = image.size
  if (w, h) == (size, size):
    return image
  side = min(w, h)
  x0, y0 = (w - side) / 2, (h - side) / 2
  return image.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side), reducing_gap=3.0)


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
  """The caption of the mirrored image: 'a star left of a circle' -> 'a star right of a circle'."""
  def swap(m):
    word = "right" if m.group(0).lower() == "left" else "left"
    return word.capitalize() if m.group(0)[0].isupper() else word
  return _LEFT_RIGHT.sub(swap, text)


# ------------------------------------------------------------------------------------------------ training


@dataclasses.dataclass(frozen=True)
class ExampleMaker:
  """(global stream position, record id) -> (cropped S x S image, caption ids [L], its false twin's ids [L] or
  None), or why it can not be used."""

  source: sources_lib.Source
  tokenizer: tokenizers_lib.Tokenizer
  seed: int
  num_records: int
  image_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip: bool

  def __call__(self, position: int, record_id: int, attempt: int = 0,
               record: dict | BadExample | None = None) -> tuple[Image.Image, np.ndarray, np.ndarray | None] | str:
    """attempt > 0: the example is a substitute for an unusable one (see `substitute`), with its own draws.

    record: source[record_id] when it was read ahead (what reading it raised, if it failed); else read here.
    """
    epoch = position // self.num_records
    rng = np.random.default_rng([self.seed, epoch, record_id] + ([attempt] if attempt else []))
    try:
      if isinstance(record, BadExample):
        raise record
      record = self.source[record_id] if record is None else record
      captions = [c for c in record["captions"] if c and c.strip()]
      if not captions:
        raise BadExample("empty_caption")
      # Decode no smaller than the smallest crop needs to fill the image at full resolution.
      min_side = math.ceil(self.image_size / math.sqrt(self.crop_scale[0]))
      image = random_resized_crop(load_image(record, min_side), rng, self.image_size, self.crop_scale,
                                  self.crop_ratio)
      pick = int(rng.integers(len(captions)))
      caption = captions[pick]
      negative = None
      if "hard_negatives" in record:  # its false twin, the same sentence with one thing changed (scenes)
        negative = dict(zip(record["captions"], record["hard_negatives"]))[caption]
      if self.flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        caption = swap_left_right(caption)
        negative = negative and swap_left_right(negative)
    except BadExample as e:
      return e.reason
    encode = lambda text: None if text is None else self.tokenizer.encode([text])[0]
    return image, encode(caption), encode(negative)

  def substitute(self, position: int, attempt: int) -> int:
    """The record tried at `position` after `attempt` unusable ones: drawn from a stream seeded by (seed,
    position), so it is the same whichever worker makes the chunk, and whatever the chunk size."""
    return int(np.random.default_rng([self.seed, position, attempt, _SUBSTITUTE]).integers(self.num_records))


_SUBSTITUTE = 0x5B  # keeps the substitutes' seeds apart from the examples' own [seed, epoch, record id]


@dataclasses.dataclass(frozen=True)
class ChunkMaker:
  """Chunk c -> examples K c ... K (c + 1) - 1 of this process's stream, stacked, every row usable.

  {'image': uint8 [K, S, S, 3], 'text': int32 [K, L], 'example_id': int32 [K], with hard negatives (a source's
  `hard_negatives`) 'hard_negative': int32 [K, L] (a row equal to its text is none), 'skip': K tuples of the reasons
  why records tried for that row could not be used, () for most rows}. An unusable example is replaced in its
  own row by a substitute (`ExampleMaker.substitute`), so stream index k is always row k % K of chunk k // K:
  chunks stay aligned with batches after a skip, and a chunk of a whole batch is the batch, not copied again
  (copying batches together from two chunks' usable rows, as a skip once made it, cost the training process
  2.5 times the CPU time per example). A row whose `max_tries` records all fail stays zeros; the skip counter
  stops the run on it.

  A chunk, not an example, is the unit a worker hands over: handed over one by one, 288 px examples cost the
  main process about three times the CPU time (0.9-1.2 ms against 0.35 ms each, measured on the 2-core machine
  of the README), and it has every example to handle.
  """

  make_example: ExampleMaker
  record_at: Callable[[int], tuple[int, int]]  # stream index k -> (global position, record id)
  size: int
  max_tries: int
  read_threads: int = 1  # > 1: the chunk's records read together first (remote data: reads wait on the network)

  def __call__(self, chunk: int) -> dict:
    k = self.size * chunk
    s, length = self.make_example.image_size, self.make_example.tokenizer.max_len
    out = {"image": np.zeros((self.size, s, s, 3), np.uint8), "text": np.zeros((self.size, length), np.int32),
           "example_id": np.zeros((self.size,), np.int32)}
    if getattr(self.make_example.source, "hard_negatives", ()):
      out["hard_negative"] = np.zeros((self.size, length), np.int32)
    rows = [tuple(int(x) for x in self.record_at(k + i)) for i in range(self.size)]
    records = [None] * self.size
    if self.read_threads > 1:
      records = list(_reader_pool(self.read_threads).map(functools.partial(_read, self.make_example.source),
                                                         [record_id for _, record_id in rows]))
    skips = []
    for i, (position, record_id) in enumerate(rows):
      reasons = []
      example = self.make_example(position, record_id, record=records[i])
      while isinstance(example, str):
        reasons.append(example)
        if len(reasons) >= self.max_tries:
          break
        record_id = self.make_example.substitute(position, len(reasons))
        example = self.make_example(position, record_id, attempt=len(reasons))
      skips.append(tuple(reasons))
      if not isinstance(example, str):
        out["image"][i] = np.asarray(example[0])
        out["text"][i], out["example_id"][i] = example[1], record_id
        if "hard_negative" in out:
          out["hard_negative"][i] = example[1] if example[2] is None else example[2]
    out["skip"] = tuple(skips)
    return out


def _read(source: sources_lib.Source, record_id: int) -> dict | BadExample:
  try:
    return source[record_id]
  except BadExample as e:
    return e


_READER_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _reader_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  """This process's pool of `threads` record readers (each worker process makes its own)."""
  if threads not in _READER_POOLS:
    _READER_POOLS[threads] = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="record-reader")
  return _READER_POOLS[threads]


class SkipCounter:
  """Counts unusable examples by reason, and fails after too many in a row (a wrong path or format)."""

  def __init__(self, max_consecutive: int):
    self.counts = collections.Counter()
    self.max_consecutive = max_consecutive
    self._consecutive = 0

  def __call__(self, reason: str | None) -> None:
    if reason is None:
      self._consecutive = 0
      return
    self.counts[reason] += 1
    self._consecutive += 1
    if self._consecutive >= self.max_consecutive:
      raise RuntimeError(f"{self._consecutive} unusable examples in a row (last: {reason!r}; so far "
                         f"{dict(self.counts)}). Check the data path and format.")


_BATCH_KEYS = ("image", "text", "example_id", "hard_negative")  # those a chunk has


class TrainIterator:
  """Per-process batches with exact resume: get_state() / set_state(state) (a JSON-serialisable dict).

  Batch j is stream indices [j b, (j + 1) b): whole chunks, since every chunk row is usable (ChunkMaker), and a
  batch of one whole chunk is handed over as it is. The skipped records each row tried are counted, in stream
  order, when the row is taken: the counts do not depend on the chunk size or the number of workers.
  The state is {'pipeline': {'next_index': k}, 'skipped': {reason: count}}: k examples of this process's
  stream have been taken. set_state rebuilds the grain graph from k's chunk rather than restoring grain's own
  iterator state, which would name each worker's position and so tie a checkpoint to the worker count. Worker
  processes start at the first `next`, so building then restoring starts them once.
  """

  def __init__(self, build: Callable[[int], grain.IterDataset], chunk_size: int, batch_size: int,
               counter: SkipCounter):
    self._build, self._chunk_size, self._batch_size, self._counter = build, chunk_size, batch_size, counter
    self._next = 0  # stream index of the next example to take
    self._chunks = None  # grain iterator over chunks
    self._chunk, self._chunk_start = None, 0

  def __iter__(self) -> TrainIterator:
    return self

  def _current_chunk(self) -> dict:
    """The chunk holding stream index self._next, fetched from the workers if it is not at hand."""
    if self._chunk is None or self._next >= self._chunk_start + self._chunk_size:
      if self._chunks is None:
        first = self._next // self._chunk_size
        self._chunks = iter(self._build(first))
        self._chunk_start = (first - 1) * self._chunk_size
        # Stop the workers before the interpreter tears its modules down: left to garbage collection then,
        # grain's clean-up finds them gone and shared-memory blocks are reported leaked.
        atexit.register(_close_if_alive, weakref.ref(self))
      self._chunk = next(self._chunks)
      self._chunk_start += self._chunk_size
    return self._chunk

  def __next__(self) -> dict[str, np.ndarray]:
    pieces, need = [], self._batch_size  # (chunk, first row, end row) in batch order
    while need:
      chunk = self._current_chunk()
      i = self._next - self._chunk_start
      end = min(self._chunk_size, i + need)
      for reasons in chunk["skip"][i:end]:
        for reason in reasons:
          self._counter(reason)
        self._counter(None)
      pieces.append((chunk, i, end))
      need -= end - i
      self._next = self._chunk_start + end
    if len(pieces) == 1 and pieces[0][2] - pieces[0][1] == self._chunk_size:  # a whole chunk: as it is
      return {key: np.asarray(pieces[0][0][key]) for key in _BATCH_KEYS if key in chunk}
    return {key: np.concatenate([chunk[key][i:end] for chunk, i, end in pieces]) for key in _BATCH_KEYS
            if key in chunk}

  @property
  def stats(self) -> dict[str, int]:
    """Skip counters for logging: 'skipped' in total and 'skipped/<reason>' each."""
    return stats_of(self.get_state())

  def get_state(self) -> dict:
    return {"pipeline": {"next_index": self._next}, "skipped": dict(self._counter.counts)}

  def set_state(self, state: dict) -> None:
    self.close()
    self._next = int(state["pipeline"]["next_index"])
    self._counter.counts = collections.Counter(state["skipped"])

  def close(self) -> None:
    """Stops the worker processes now (garbage collection would too, later); the next `next` restarts them."""
    if self._chunks is not None:
      self._chunks.close()
    self._chunks, self._chunk = None, None


def stats_of(state: dict) -> dict[str, int]:
  """A TrainIterator state's skip counters, for logging: 'skipped' in total and 'skipped/<reason>' each."""
  counts = state["skipped"]
  return {"skipped": sum(counts.values())} | {f"skipped/{reason}": n for reason, n in sorted(counts.items())}


def _close_if_alive(iterator: weakref.ref) -> None:
  if iterator() is not None:
    iterator().close()


def _process_layout(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
  return process_index, process_count


def available_cores() -> int:
  """Cores this process may run on: its CPU affinity (taskset, SLURM, containers' cpusets), else all."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _available_memory() -> tuple[int | None, int | None]:
  """(bytes of host memory available, bytes free in /dev/shm), None where the system does not say."""
  memory = shm = None
  try:
    with open("/proc/meminfo") as f:
      memory = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
  except (OSError, StopIteration, ValueError):
    pass
  try:
    stat = os.statvfs("/dev/shm")
    shm = stat.f_bavail * stat.f_frsize
  except OSError:
    pass
  return memory, shm


@dataclasses.dataclass(frozen=True)
class WorkerNeed:
  """What the automatic worker count is derived from (build_train_iterator measures it)."""
  examples_per_sec: float   # this host's need: its share of the batch x data_config.target_steps_per_sec
  worker_rate: float        # examples/s one worker makes, measured on this host's first examples
  chunk_bytes: int          # one chunk as handed over


def resolve_num_workers(data_config, need: WorkerNeed | None = None) -> int:
  """data_config.num_workers, with -1 (automatic) made concrete, within what memory and /dev/shm hold.

  Automatic: the built-in scenes decode in this process (0), since at 64 px one process renders several times
  what the tiny model trains on (README, "Feeding a pod host"), and each worker costs seconds of start-up (a
  fresh interpreter importing grain and JAX), again at every resume, on the CPU the model needs. Real data:
  enough workers for `need` (the host's examples/s over one worker's measured rate, plus one for the
  hand-over), at most one per available core but one (which the training loop keeps), and no more than host
  memory and /dev/shm hold: each worker holds about num_threads + 2 chunks in memory (4 for remote data,
  `_thread_layout`) and 2 in /dev/shm (grain's shared-memory hand-over). Without `need`, as many as the cores
  allow.
  A count set by hand is checked against /dev/shm alone: too small, and the message says what to change.
  """
  num_workers = data_config.get("num_workers", -1)
  if num_workers < -1:
    raise ValueError(f"data_config.num_workers={num_workers}: use -1 (automatic), 0 (no workers) or a count.")
  if num_workers == -1 and data_config.name == "scenes":
    return 0
  if num_workers == 0:
    return 0
  memory, shm = _available_memory()
  shm_per_worker = 2 * need.chunk_bytes if need else 0
  if num_workers > 0:
    if shm is not None and shm < num_workers * shm_per_worker:
      raise ValueError(_shm_message(shm, num_workers, shm_per_worker))
    return num_workers
  count = max(1, available_cores() - 1)
  if need is None:
    return count
  count = min(count, 1 + math.ceil(need.examples_per_sec / max(need.worker_rate, 1e-9)))
  if memory is not None:  # half of what is available, the rest left to the training process
    count = min(count, max(1, memory // 2 // ((_thread_layout(data_config)[0] + 2) * need.chunk_bytes)))
  if shm is not None and shm < count * shm_per_worker:
    fits = shm // shm_per_worker
    logging.warning("%s Running %d worker(s) instead of %d.", _shm_message(shm, count, shm_per_worker), fits,
                    count)
    count = fits
  return count


def _shm_message(shm: int, workers: int, per_worker: int) -> str:
  return (f"/dev/shm has {shm / 2**20:.0f} MiB free; {workers} input worker(s) hand over batches through it and "
          f"need about {workers * per_worker / 2**20:.0f} MiB ({per_worker / 2**20:.0f} MiB each). Give the "
          f"container more (docker run --shm-size={math.ceil(workers * per_worker / 2**30) + 1}g, or a larger "
          f"emptyDir medium: Memory on Kubernetes), or set data.num_workers lower (0: decode in the training "
          f"process).")


def resolve_num_threads(data_config) -> int:
  """data_config.num_threads, with -1 (automatic) made concrete: 16 for data in a bucket, else 2.

  Reads from Cloud Storage wait on the network (tens of ms each) rather than the CPU, so many are kept in
  flight; local reads are CPU-bound decodes, and more threads than the worker's share of a core only contend.
  """
  num_threads = data_config.get("num_threads", -1)
  if num_threads != -1:
    return num_threads
  return 16 if _remote(data_config) else 2


def _remote(data_config) -> bool:
  return paths.is_url(data_config.get("path", "") or "")


def _thread_layout(data_config) -> tuple[int, int]:
  """(chunks made at once per process, record reads in flight per chunk) from the read threads.

  Local data: num_threads chunks at once, each reading its records as it decodes them. Remote data: two
  chunks at once, each reading all its records first with num_threads reads in flight, so a whole-batch
  chunk does not wait on hundreds of network reads one after another, and memory holds 2 chunks, not 16.
  """
  num_threads = resolve_num_threads(data_config)
  return (min(2, num_threads), num_threads) if _remote(data_config) else (num_threads, 1)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """Worker start-up: end this process when its parent ends, however it ends.

  grain stops its workers when the iterator is closed or collected, or when the interpreter exits normally. A
  parent killed outright (SIGKILL, the OOM killer) does neither, and the workers would be left running.
  """
  del worker_index, worker_count
  parent = multiprocessing.parent_process()
  if parent is None:
    return

  def watch():
    mp_connection.wait([parent.sentinel])
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def build_train_iterator(data_config, *, global_batch_size: int, seed: int, process_index: int | None = None,
                         process_count: int | None = None) -> TrainIterator:
  """Infinite iterator over this process's slices of the global training batches (see module docstring)."""
  process_index, process_count = _process_layout(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the {process_count} processes.")
  source = sources_lib.build_source(data_config, data_config.get("split", "train"))
  num_records = len(source)
  if num_records == 0:
    raise ValueError(f"{source} has no examples.")
  local_batch = global_batch_size // process_count
  # A paired source's records 2 i and 2 i + 1 belong together (scene twins): the order shuffles pairs, and
  # positions 2 j and 2 j + 1 of the stream hold one pair, in one process's slice of the batch.
  pair = 2 if getattr(source, "paired", False) else 1
  if local_batch % pair:
    raise ValueError(f"config.data.scenes.twins: each process's batch ({global_batch_size} // {process_count} "
                     f"processes) must be even to hold whole pairs.")
  order = grain.MapDataset.range(num_records // pair).shuffle(seed=seed).repeat()

  def this_process(k):
    position = (k // local_batch) * global_batch_size + process_index * local_batch + k % local_batch
    return position, pair * order[position // pair] + position % pair

  make_example = ExampleMaker(
      source=source, tokenizer=tokenizer_from_config(data_config), seed=seed, num_records=num_records,
      image_size=data_config.image_size, crop_scale=tuple(data_config.crop_scale),
      crop_ratio=tuple(data_config.crop_ratio), flip=data_config.flip)
  example_bytes = example_bytes_of(data_config)
  chunk_size = _chunk_size(local_batch, example_bytes)
  chunk_threads, read_threads = _thread_layout(data_config)
  make_chunk = ChunkMaker(make_example, this_process, chunk_size, data_config.max_consecutive_skips, read_threads)
  need = None
  if data_config.get("num_workers", -1) != 0 and data_config.name != "scenes":
    need = WorkerNeed(local_batch * data_config.get("target_steps_per_sec", 8.0),
                      _measure_rate(make_example, this_process), chunk_size * example_bytes)
  num_workers = resolve_num_workers(data_config, need)
  if need:
    logging.info("Input: %d worker(s), each making %d chunk(s) of %d examples (%.0f MiB) at once with %d read(s) "
                 "in flight; one worker makes about %.0f examples/s, the host needs %.0f at "
                 "data.target_steps_per_sec.", num_workers, chunk_threads, chunk_size, need.chunk_bytes / 2**20,
                 read_threads, need.worker_rate, need.examples_per_sec)
  # Each process reads ahead its share of the buffer, and at least a chunk per thread to keep them busy.
  per_process_chunks = -(-data_config.prefetch_buffer_size // (chunk_size * max(1, num_workers)))
  read_options = grain.ReadOptions(num_threads=chunk_threads,
                                   prefetch_buffer_size=max(chunk_threads, per_process_chunks))
  if num_workers and not flags.FLAGS.is_parsed():
    # grain reads its absl flags when it starts workers; outside an absl app (pytest, a notebook) nothing has
    # parsed them, and reading them would raise: take their defaults.
    flags.FLAGS.mark_as_parsed()

  def build(first_chunk: int) -> grain.IterDataset:
    dataset = (grain.MapDataset.range(first_chunk, len(order) // process_count // chunk_size)
               .map(make_chunk)
               .to_iter_dataset(read_options))
    if num_workers:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=1),
                                    worker_init_fn=_exit_with_parent)
    return dataset

  return TrainIterator(build, chunk_size, local_batch, SkipCounter(data_config.max_consecutive_skips))


def example_bytes_of(data_config) -> int:
  """Bytes of one example as handed over: uint8 pixels, int32 caption ids and record id."""
  return 3 * data_config.image_size**2 + 4 * (data_config.max_len + 1)


def _measure_rate(make_example: ExampleMaker, record_at: Callable[[int], tuple[int, int]], count: int = 8) -> float:
  """Examples per CPU-second of this process's first `count` examples (what one worker makes on one core)."""
  start = time.thread_time()
  for k in range(count):
    make_example(*(int(x) for x in record_at(k)))
  return count / max(time.thread_time() - start, 1e-6)


# A host's whole batch is one chunk (handed on without a copy) up to this size: 2,900 examples at 288 px as
# uint8, beyond the per-host batch of every slice in the README (v5p-32's is 512, 127 MB). Larger shares are
# split into chunks of a divisor of the batch, since each worker holds a few chunks in memory.
_CHUNK_BYTES = 700 << 20


def _chunk_size(local_batch: int, example_bytes: int) -> int:
  """Examples per chunk: the batch, or its largest divisor whose chunk stays under _CHUNK_BYTES."""
  fits = max(1, _CHUNK_BYTES // example_bytes)
  return max(k for k in range(1, min(local_batch, fits) + 1) if local_batch % k == 0)


# ------------------------------------------------------------------------------------------------ evaluation


_MAX_EVAL_EXAMPLES = 10_000_000  # annotations are read up front


class EvalSplit:
  """An evaluation split: annotations up front, images on demand.

  Attributes (None where the split has none):
    name, image_size, source (the records behind it: e.g. the scenes source's scene(i))
    captions      list (one per image) of lists of reference captions (5 per image for scenes' test)
    labels        int32 [N] class indices; class_names and templates (prompt strings with '{}') with them
    scene_graphs  list of scene-graph dicts (built-in scenes)
    qa            list of lists of (question, answer) pairs (built-in scenes, easy-vqa); answers: their
                  answer vocabulary
  An image that can not be decoded comes back with mask False (and its index), like padding.
  """

  def __init__(self, name: str, source: sources_lib.Source, image_size: int):
    self.name, self.image_size, self.source = name, image_size, source
    annotations = [source.annotations(i) for i in range(len(source))]
    self.captions = [a["captions"] for a in annotations] if "captions" in annotations[0] else None
    self.labels = np.asarray([a["label"] for a in annotations], np.int32) if "label" in annotations[0] else None
    self.scene_graphs = [a["scene_graph"] for a in annotations] if "scene_graph" in annotations[0] else None
    self.qa = [a["qa"] for a in annotations] if "qa" in annotations[0] else None
    self.class_names = getattr(source, "class_names", None)
    self.templates = getattr(source, "templates", None)
    self.answers = getattr(source, "answers", None) if self.qa is not None else None

  def __len__(self) -> int:
    return len(self.source)

  def image(self, index: int) -> np.ndarray:
    """uint8 [S, S, 3] pixels (normalised on the device, like training's); raises BadExample if undecodable."""
    image = load_image(self.source[index], min_side=self.image_size)
    return np.asarray(resize_center_crop(image, self.image_size))

  def _masked_image(self, index: int) -> tuple[np.ndarray, bool]:
    if index >= len(self):  # padding of the last batch
      return np.zeros((self.image_size, self.image_size, 3), np.uint8), False
    try:
      return self.image(index), True
    except BadExample:
      return np.zeros((self.image_size, self.image_size, 3), np.uint8), False

  def batches(self, global_batch_size: int, *, process_index: int | None = None,
              process_count: int | None = None, num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """This process's slices of the global eval batches; every process yields the same number of them.

    Yields {'image': uint8 [b, S, S, 3], 'index': int32 [b] (-1 for padding), 'mask': bool [b]};
    mask is False for padding and for images that could not be decoded.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {process_count} processes.")
    b = global_batch_size // process_count
    num_batches = -(-len(self) // global_batch_size)
    # Batch k of process p holds global positions k * B + p * b ... k * B + (p + 1) * b - 1.
    positions = [k * global_batch_size + process_index * b + j for k in range(num_batches) for j in range(b)]

    def load(position: int) -> dict:
      image, valid = self._masked_image(position)
      return {"image": image, "index": np.int32(position if valid or position < len(self) else -1),
              "mask": np.bool_(valid)}

    dataset = (grain.MapDataset.source(positions).map(load)
               .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * b))
               .batch(b))
    yield from dataset


def load_eval_split(data_config, split: str, max_examples: int = 0) -> EvalSplit:
  """Evaluation split `split` of the configured dataset, limited to its first `max_examples` (0: all).

  scenes: 'test', 'test_comp', 'zeroshot_shape', 'zeroshot_colour', 'zeroshot_digit', and the validation twins
  'val', 'zeroshot_shape_val', 'zeroshot_colour_val', 'zeroshot_digit_val'; coco_json / tfds: the
  source's split names; under any dataset: 'sklearn_digits', 'lfw_subset', 'easy_vqa_train', 'easy_vqa_test'.
  """
  source = sources_lib.build_source(data_config, split)
  if max_examples:
    source = sources_lib.HeadSource(source, max_examples)
  if len(source) > _MAX_EVAL_EXAMPLES:
    raise ValueError(f"{source} is too large to evaluate on ({len(source)} examples); for the scenes' train "
                     "split set data_config.scenes.num_train, or evaluate on the first max_examples.")
  return EvalSplit(split, source, data_config.image_size)
