"""Input pipeline throughput on this machine, in examples per second.

  python -m sycoca_jax.tools.data_benchmark [--batch_size=64] [--num_batches=20] [--num_threads=2]

Rows:
  scenes generator     ScenesSource[i] alone (layout, captions, rendering), one thread
  scenes pipeline      build_train_iterator on the built-in scenes (crop, normalise, tokenise, batch)
  array_record reader  build_train_iterator over img2dataset-style shards of 400x300 JPEG photos, converted to
                       array_record first (written to a temporary folder), with the CLIP BPE tokenizer
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from sycoca_jax import data
from sycoca_jax.data import scenes
from sycoca_jax.data import webdataset

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 20, "Timed batches per row (after 2 warm-up batches).")
_NUM_THREADS = flags.DEFINE_integer("num_threads", 2, "grain read threads.")


def _pipeline_rate(cfg) -> float:
  it = data.build_train_iterator(cfg, global_batch_size=_BATCH_SIZE.value, seed=0, process_index=0,
                                 process_count=1)
  for _ in range(2):  # warm-up: thread start, background photos loaded once per process
    next(it)
  start = time.perf_counter()
  for _ in range(_NUM_BATCHES.value):
    next(it)
  return _NUM_BATCHES.value * _BATCH_SIZE.value / (time.perf_counter() - start)


def _generator_rate(image_size: int) -> float:
  source = scenes.ScenesSource("train", image_size=image_size)
  warm_up = 100  # enough scenes to have read every background photo once
  for i in range(warm_up):
    source[i]
  n = _NUM_BATCHES.value * _BATCH_SIZE.value // 2
  start = time.perf_counter()
  for i in range(warm_up, warm_up + n):
    source[i]
  return n / (time.perf_counter() - start)


def _write_photo_shards(directory: str, num_examples: int, per_shard: int = 128) -> None:
  """img2dataset-like shards: 400x300 JPEG crops of the scenes' background photos, .txt and .json each."""
  rng = np.random.default_rng(0)
  photos = [scenes._library_image(name) for name in scenes._PHOTOS]  # pylint: disable=protected-access
  for shard in range(-(-num_examples // per_shard)):
    with tarfile.open(os.path.join(directory, f"{shard:05d}.tar"), "w") as tar:
      for k in range(shard * per_shard, min(num_examples, (shard + 1) * per_shard)):
        photo = photos[k % len(photos)]
        x, y = int(rng.integers(photo.width - 200)), int(rng.integers(photo.height - 150))
        buffer = io.BytesIO()
        photo.resize((400, 300), box=(x, y, x + 200, y + 150)).save(buffer, "JPEG", quality=90)
        caption = f"a photo number {k} of something interesting, taken outdoors"
        for ext, payload in (("jpg", buffer.getvalue()), ("txt", caption.encode()),
                             ("json", json.dumps({"caption": caption, "key": f"{k:09d}"}).encode())):
          info = tarfile.TarInfo(f"{k:09d}.{ext}")
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))


def main(argv):
  del argv
  rows = []
  for size in (64, 224):
    rows.append(("scenes generator", size, 1, _generator_rate(size)))
  for size in (64, 224):
    cfg = data.default_data_config()
    cfg.update({"image_size": size, "num_threads": _NUM_THREADS.value})
    rows.append(("scenes pipeline", size, _NUM_THREADS.value, _pipeline_rate(cfg)))
  with tempfile.TemporaryDirectory() as tmp:
    shards, records = os.path.join(tmp, "shards"), os.path.join(tmp, "records")
    os.makedirs(shards)
    _write_photo_shards(shards, (_NUM_BATCHES.value + 4) * _BATCH_SIZE.value)
    webdataset.convert(os.path.join(shards, "*.tar"), records)
    cfg = data.default_data_config()
    cfg.update({"name": "webdataset_array_record", "path": os.path.join(records, "*.array_record"),
                "tokenizer": "clip_bpe", "max_len": 77, "image_size": 224, "num_threads": _NUM_THREADS.value})
    rows.append(("array_record reader (JPEG 400x300)", 224, _NUM_THREADS.value, _pipeline_rate(cfg)))

  print(f"{'pipeline':<36} {'px':>5} {'threads':>8} {'batch':>6} {'examples/s':>11}")
  for name, size, threads, rate in rows:
    print(f"{name:<36} {size:>5} {threads:>8} {_BATCH_SIZE.value:>6} {rate:>11.0f}")
  print(f"(CPU cores available: {os.cpu_count()})")


if __name__ == "__main__":
  app.run(main)
