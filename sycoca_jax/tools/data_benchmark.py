"""Input pipeline throughput on this machine, in examples per second and per core, against what a pod host needs.

  python -m sycoca_jax.tools.data_benchmark [--batch_size=128] [--num_batches=10] [--num_threads=2] [--workers=1,2]
      [--train_tflop_per_example=0.45 --mfu=0.5 --peak_tflops=197 --chips=64 --hosts=16 --train_batch_size=2048]

Rows:
  scenes generator     ScenesSource[i] alone (layout, captions, rendering), one thread
  scenes pipeline      build_train_iterator on the built-in scenes (crop, tokenise, batch)
  array_record reader  build_train_iterator over img2dataset-style shards of JPEG photos, converted to
                       array_record first (written to a temporary folder), with the CLIP BPE tokenizer:
                       400x300 photos (quality 90) at 224 px, and the base config's preprocessing
                       (configs/sycoca_base.py: 288 px, max_len 76, crop scale 0.9-1) on 427x320 photos at
                       quality 95, what the README's img2dataset command (--image_size 320 --resize_mode
                       keep_ratio, its default quality) writes for 4:3 images; with 0 workers and each count
                       in --workers, then "after a skip": shards where one example in 64 is a truncated
                       JPEG, each replaced inside its chunk by a substitute (pipeline.ChunkMaker)

Columns: `workers` input worker processes (0: decoding in this process, with `threads` threads); `examples/s` the
rate; `cores` CPU seconds spent per second by this process and its workers together; `ex/s/core` examples per
CPU second, the rate one fully busy core gives (decoding, with workers); `MB/ex` bytes per example handed over
to the training process (uint8 pixels, caption ids, record id); `main us/ex` this process's CPU time per
example, reading every memory page of each batch once as the copy to the devices will, and `ceiling` the rate
that cost allows (with workers, the training process handles every batch: its own limit, whatever the number
of workers); `worker MiB` resident memory per worker. On a machine shared with other work, examples/s follows the share of
the cores this run got; the CPU-time columns hold still.

Below the table, an estimate (not a measurement) of what one host of a pod must deliver: a train step on
`chips` chips takes train_batch_size * train_tflop_per_example / (chips * mfu * peak_tflops) seconds, and each
of the `hosts` hosts feeds train_batch_size / hosts examples per step. The defaults are a v5e-64 slice (16 hosts
of 4 chips, 197 TFLOP/s bf16 per chip) running configs/sycoca_base.py (batch 2048, ~0.45 TFLOP per example for
forward and backward, XLA's count; DESIGN.md section 5) at 50 % MFU.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from sycoca_jax import data
from sycoca_jax.data import pipeline
from sycoca_jax.data import scenes
from sycoca_jax.data import webdataset

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples per batch (128: a v5e-64 host's share of 2048).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 10, "Timed batches per row (after the warm-up ones).")
_NUM_THREADS = flags.DEFINE_integer("num_threads", 2, "grain read threads per process.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker counts for the base-config rows (0 is always run).")
_TFLOP = flags.DEFINE_float("train_tflop_per_example", 0.45, "Train-step TFLOP per example (forward + backward).")
_MFU = flags.DEFINE_float("mfu", 0.5, "Assumed model FLOPs utilisation of the train step.")
_PEAK = flags.DEFINE_float("peak_tflops", 197.0, "Dense bf16 peak TFLOP/s per chip (v5e: 197).")
_CHIPS = flags.DEFINE_integer("chips", 64, "Chips in the slice.")
_HOSTS = flags.DEFINE_integer("hosts", 16, "Hosts in the slice (each runs one input pipeline).")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch_size", 2048, "Global training batch.")

_BASE = "base config (JPEG 427x320)"


def _cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _rss_mib(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
  except (OSError, StopIteration):
    return float("nan")


def _touch(batch: dict) -> None:
  """Reads one word of every memory page of the batch, as copying it to the devices will (and maps the pages)."""
  for array in batch.values():
    np.bitwise_or.reduce(array.reshape(-1).view(np.uint8)[::4096])


def _pipeline_row(name: str, cfg) -> dict:
  it = data.build_train_iterator(cfg, global_batch_size=_BATCH_SIZE.value, seed=0, process_index=0,
                                 process_count=1)
  threads = pipeline.resolve_num_threads(cfg)
  # Warm-up: workers started, background photos loaded once per process, and the batches made ahead while the
  # first one was awaited (up to num_threads + 2 per worker) used up, so that the timed batches are made in the
  # timed window: this loop consumes faster than the pipeline makes.
  for _ in range(2 + max(1, pipeline.resolve_num_workers(cfg)) * (threads + 2)):
    next(it)
  workers = [p.pid for p in multiprocessing.active_children()]
  skipped = it.stats["skipped"]
  start, main_cpu = time.perf_counter(), time.process_time()
  worker_cpu = [_cpu_seconds(pid) for pid in workers]
  handed_over = 0
  for _ in range(_NUM_BATCHES.value):
    batch = next(it)
    _touch(batch)
    handed_over += sum(array.nbytes for array in batch.values())
  wall, main_cpu = time.perf_counter() - start, time.process_time() - main_cpu
  worker_cpu = sum(_cpu_seconds(pid) - c for pid, c in zip(workers, worker_cpu))
  rss = np.mean([_rss_mib(pid) for pid in workers]) if workers else float("nan")
  skipped = it.stats["skipped"] - skipped
  it.close()
  n = _NUM_BATCHES.value * _BATCH_SIZE.value
  return {"name": name, "px": cfg.image_size, "workers": pipeline.resolve_num_workers(cfg), "threads": threads,
          "rate": n / wall, "cores": (main_cpu + worker_cpu) / wall, "per_core": n / (main_cpu + worker_cpu),
          "mb": handed_over / n / 1e6, "main_us": 1e6 * main_cpu / n, "rss": rss, "skipped": skipped}


def _generator_row(image_size: int) -> dict:
  source = scenes.ScenesSource("train", image_size=image_size)
  warm_up = 100  # enough scenes to have read every background photo once
  for i in range(warm_up):
    source[i]
  n = _NUM_BATCHES.value * _BATCH_SIZE.value // 2
  start, cpu = time.perf_counter(), time.process_time()
  for i in range(warm_up, warm_up + n):
    source[i]
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  return {"name": "scenes generator", "px": image_size, "workers": 0, "threads": 1, "rate": n / wall,
          "cores": cpu / wall, "per_core": n / cpu, "mb": float("nan"), "main_us": 1e6 * cpu / n,
          "rss": float("nan"), "skipped": 0}


def _write_photo_shards(directory: str, num_examples: int, size: tuple[int, int], quality: int,
                        per_shard: int = 128, corrupt_every: int = 0) -> None:
  """img2dataset-like shards: JPEG crops of the scenes' background photos, .txt and .json each; with
  corrupt_every, every corrupt_every-th JPEG truncated to half its bytes (an unusable example)."""
  rng = np.random.default_rng(0)
  photos = [scenes._library_image(name) for name in scenes._PHOTOS]  # pylint: disable=protected-access
  w, h = size[0] // 2, size[1] // 2  # crops upsampled 2x, as web photos are larger than the library's
  for shard in range(-(-num_examples // per_shard)):
    with tarfile.open(os.path.join(directory, f"{shard:05d}.tar"), "w") as tar:
      for k in range(shard * per_shard, min(num_examples, (shard + 1) * per_shard)):
        photo = photos[k % len(photos)]
        x, y = int(rng.integers(photo.width - w)), int(rng.integers(photo.height - h))
        buffer = io.BytesIO()
        photo.resize(size, Image.BICUBIC, box=(x, y, x + w, y + h)).save(buffer, "JPEG", quality=quality)
        jpeg = buffer.getvalue()
        if corrupt_every and k % corrupt_every == corrupt_every // 2:
          jpeg = jpeg[:len(jpeg) // 2]
        caption = f"a photo number {k} of something interesting, taken outdoors"
        for ext, payload in (("jpg", jpeg), ("txt", caption.encode()),
                             ("json", json.dumps({"caption": caption, "key": f"{k:09d}"}).encode())):
          info = tarfile.TarInfo(f"{k:09d}.{ext}")
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))


def _array_records(tmp: str, size: tuple[int, int], quality: int, corrupt_every: int = 0) -> str:
  name = f"{size[0]}_{corrupt_every}"
  shards, records = os.path.join(tmp, f"shards_{name}"), os.path.join(tmp, f"records_{name}")
  os.makedirs(shards)
  _write_photo_shards(shards, 4 * _BATCH_SIZE.value, size, quality, corrupt_every=corrupt_every)  # read again
  # in later epochs
  webdataset.convert(os.path.join(shards, "*.tar"), records)
  return os.path.join(records, "*.array_record")


def _print_estimate(rows: list[dict]) -> None:
  step_s = _TRAIN_BATCH.value * _TFLOP.value / (_CHIPS.value * _MFU.value * _PEAK.value)
  per_host = _TRAIN_BATCH.value / _HOSTS.value / step_s
  print(f"\nPer-host need, an ESTIMATE from assumptions (not measured): {_CHIPS.value} chips, {_HOSTS.value} hosts, "
        f"global batch {_TRAIN_BATCH.value},\n{_TFLOP.value} TFLOP per example per train step, "
        f"{100 * _MFU.value:.0f} % MFU of {_PEAK.value:g} TFLOP/s per chip:")
  print(f"  step time     {_TRAIN_BATCH.value} x {_TFLOP.value} TFLOP / ({_CHIPS.value} x {_MFU.value} x "
        f"{_PEAK.value:g} TFLOP/s) = {step_s:.3f} s")
  print(f"  per host      {_TRAIN_BATCH.value} / {_HOSTS.value} / {step_s:.3f} s = {per_host:.0f} examples/s")
  for row in (r for r in rows if r["name"].startswith(_BASE)):
    line = (f"  {row['workers']} worker(s){row['name'][len(_BASE):]}: {row['per_core']:.0f} examples/s per core -> "
            f"{per_host / row['per_core']:.1f} busy cores per host")
    if row["workers"]:  # the main process handles every batch: its CPU time per example bounds the rate
      line += f"; the training process alone tops out near {1e6 / row['main_us']:.0f} examples/s"
    print(line)


def main(argv):
  del argv
  rows = [_generator_row(size) for size in (64, 224)]
  for size in (64, 224):
    for workers in (0, 2):
      cfg = data.default_data_config()
      cfg.update({"image_size": size, "num_threads": _NUM_THREADS.value, "num_workers": workers})
      rows.append(_pipeline_row("scenes pipeline", cfg))
  with tempfile.TemporaryDirectory() as tmp:
    cfg = data.default_data_config()
    cfg.update({"name": "webdataset_array_record", "path": _array_records(tmp, (400, 300), quality=90),
                "tokenizer": "clip_bpe", "max_len": 77, "image_size": 224, "num_threads": _NUM_THREADS.value,
                "num_workers": 0})
    rows.append(_pipeline_row("array_record reader (JPEG 400x300)", cfg))
    cfg = data.default_data_config()
    cfg.update({"name": "webdataset_array_record", "path": _array_records(tmp, (427, 320), quality=95),
                "tokenizer": "clip_bpe", "max_len": 76, "image_size": 288, "crop_scale": (0.9, 1.0),
                "num_threads": _NUM_THREADS.value})
    for workers in [0] + [int(w) for w in _WORKERS.value]:
      cfg.num_workers = workers
      rows.append(_pipeline_row(_BASE, cfg))
    cfg.path = _array_records(tmp, (427, 320), quality=95, corrupt_every=64)
    rows.append(_pipeline_row(_BASE + ", after a skip", cfg))
    assert rows[-1]["skipped"], "the after-a-skip row met no unusable example"

  print(f"{'pipeline':<42} {'px':>4} {'workers':>7} {'threads':>7} {'batch':>5} {'examples/s':>10} {'cores':>5} "
        f"{'ex/s/core':>9} {'MB/ex':>6} {'main us/ex':>10} {'ceiling':>8} {'worker MiB':>10}")
  for r in rows:
    rss = "" if np.isnan(r["rss"]) else f"{r['rss']:.0f}"
    mb = "" if np.isnan(r["mb"]) else f"{r['mb']:.3f}"
    print(f"{r['name']:<42} {r['px']:>4} {r['workers']:>7} {r['threads']:>7} {_BATCH_SIZE.value:>5} "
          f"{r['rate']:>10.0f} {r['cores']:>5.2f} {r['per_core']:>9.0f} {mb:>6} {r['main_us']:>10.0f} "
          f"{1e6 / r['main_us']:>8.0f} {rss:>10}".rstrip())
  print(f"(CPU cores available: {pipeline.available_cores()} of {os.cpu_count()}; load average over the last "
        f"5 minutes: {os.getloadavg()[1]:.1f})")
  _print_estimate(rows)


if __name__ == "__main__":
  app.run(main)
