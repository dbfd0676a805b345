"""img2dataset webdataset shards -> array_record files that grain reads with random access.

img2dataset writes tar shards of samples `KEY.jpg` + `KEY.txt` (the caption) and/or `KEY.json` (metadata
holding 'caption'). Tar files can only be read front to back, so exact resume and global shuffling need a
random-access copy; this module writes one .array_record file per tar:

  python -m sycoca_jax.data.webdataset --input='shards/*.tar' --output=DIR [--num_workers=8]

then train with data_config.name = 'webdataset_array_record', data_config.path = 'DIR/*.array_record'.

A record is  b'SYWD' | uint32 header length (little-endian) | header JSON | encoded image bytes,  where the
header holds {'key', 'captions', 'image_ext', 'meta'} ('meta': the sample's .json, if any). Images are
copied as they are, not decoded: corrupt ones are found and counted by the training pipeline.

What is left out is counted, never fatal: a sample with no image or no non-empty caption, and a whole shard
that cannot be read to its end (truncated, or not a tar at all), which is named in a warning and written
nowhere. DIR/conversion_stats.json, written at the end of every conversion, lists the shards read and
skipped (with the reason) and the samples written and skipped (by reason). Each output file is written under
a temporary name and renamed once complete, so an interrupted conversion leaves no partial .array_record
that training would read.
"""

from __future__ import annotations

import collections
import glob
import json
import multiprocessing
import os
import struct
import tarfile
import zlib
from collections.abc import Iterator

from absl import logging

_MAGIC = b"SYWD"
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
_TMP_SUFFIX = ".tmp"  # `DIR/*.array_record` does not match a file still being written


class BadShard(ValueError):
  """A tar shard that cannot be read to its end."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.reason = reason


def serialize_record(key: str, image_bytes: bytes, captions: list[str], image_ext: str = "jpg",
                     meta: dict | None = None) -> bytes:
  header = json.dumps({"key": key, "captions": captions, "image_ext": image_ext, "meta": meta or {}},
                      ensure_ascii=False).encode("utf-8")
  return _MAGIC + struct.pack("<I", len(header)) + header + image_bytes


def parse_record(data: bytes) -> dict:
  """Record bytes -> {'key', 'captions', 'image_ext', 'meta', 'image_bytes'}; ValueError if malformed."""
  if data[:4] != _MAGIC or len(data) < 8:
    raise ValueError("not a sycoca_jax webdataset record")
  (length,) = struct.unpack("<I", data[4:8])
  if 8 + length > len(data):
    raise ValueError("record header runs past the end of the record")
  try:
    header = json.loads(data[8 : 8 + length].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"unreadable record header: {e}") from e
  return header | {"image_bytes": data[8 + length :]}


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: bytes}) per sample. As in webdataset, the key is the member path up to the first
  dot of its file name, and a sample's files are adjacent in the tar. Raises BadShard, naming the file, for a
  truncated or unreadable tar."""
  key, files = None, {}
  try:
    with tarfile.open(path, "r|*") as tar:  # streaming: shards are read once, front to back
      for member in tar:
        if not member.isfile():
          continue
        directory, name = os.path.split(member.name)
        if name.startswith(".") or "." not in name:
          continue
        stem, ext = name.split(".", 1)
        member_key = os.path.join(directory, stem)
        if member_key != key:
          if files:
            yield key, files
          key, files = member_key, {}
        files[ext.lower()] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise BadShard(path, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from e
  if files:
    yield key, files


def _sample_captions(files: dict[str, bytes], meta: dict) -> list[str]:
  if "txt" in files:
    captions = [files["txt"].decode("utf-8", errors="replace").strip()]
  elif isinstance(meta.get("caption"), str):
    captions = [meta["caption"].strip()]
  else:
    captions = [str(c).strip() for c in meta.get("captions", [])]
  return [c for c in captions if c]


def convert_shard(tar_path: str, output_path: str) -> dict[str, int]:
  """One tar -> one .array_record file; returns counts of written and left-out samples.

  The file appears under `output_path` only once complete (written as output_path + '.tmp', then renamed);
  a BadShard leaves nothing behind.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  counts = collections.Counter()
  tmp_path = output_path + _TMP_SUFFIX
  # group_size:1 makes every record its own chunk: random access reads one record, not a group.
  writer = array_record_module.ArrayRecordWriter(tmp_path, "group_size:1")
  open_writer = True
  try:
    for key, files in iter_tar_samples(tar_path):
      image_ext = next((e for e in _IMAGE_EXTS if e in files), None)
      try:
        meta = json.loads(files["json"]) if "json" in files else {}
      except (UnicodeDecodeError, json.JSONDecodeError):
        meta, counts["bad_json"] = {}, counts["bad_json"] + 1
      captions = _sample_captions(files, meta)
      if image_ext is None:
        counts["no_image"] += 1
      elif not captions:
        counts["no_caption"] += 1
      else:
        writer.write(serialize_record(key, files[image_ext], captions, image_ext, meta))
        counts["written"] += 1
    open_writer = False
    writer.close()
    with open(tmp_path, "rb") as f:  # on disk before it gets its final name
      os.fsync(f.fileno())
    os.replace(tmp_path, output_path)
  except BaseException:  # an error, a bad shard or Ctrl-C: no half-written file is left
    if open_writer:
      writer.close()
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  return dict(counts)


def _convert_one(args: tuple[str, str]) -> tuple[str, dict[str, int] | str]:
  """(tar, counts), or (tar, why it was skipped) for a bad shard: one bad tar does not stop the others."""
  tar_path, output_path = args
  try:
    return tar_path, convert_shard(tar_path, output_path)
  except BadShard as e:
    return tar_path, e.reason


def convert(input_pattern: str, output_dir: str, num_workers: int = 1) -> dict:
  """Converts every tar matching `input_pattern` (a glob, or several separated by commas).

  Returns the statistics it writes to output_dir/conversion_stats.json. Raises ValueError (after writing
  them) if no shard could be read.
  """
  tars = sorted({p for pattern in input_pattern.split(",") for p in glob.glob(pattern.strip())})
  if not tars:
    raise FileNotFoundError(f"No webdataset shards match {input_pattern!r}.")
  os.makedirs(output_dir, exist_ok=True)
  jobs = [(t, os.path.join(output_dir, os.path.basename(t).split(".")[0] + ".array_record")) for t in tars]
  if len({out for _, out in jobs}) != len(jobs):
    raise ValueError("Two input shards share a file name; convert them into different output folders.")
  if num_workers > 1:
    with multiprocessing.Pool(num_workers) as pool:
      results = dict(pool.imap_unordered(_convert_one, jobs))
  else:
    results = dict(_convert_one(job) for job in jobs)

  samples, skipped_shards = collections.Counter(), {}
  for tar_path, output_path in jobs:
    result = results[tar_path]
    if isinstance(result, str):
      skipped_shards[tar_path] = result
      # An output left by an earlier conversion of this shard would be read by training but not counted here.
      stale = os.path.exists(output_path)
      if stale:
        os.remove(output_path)
      logging.warning("Skipped shard %s (%s); nothing from it is written%s.", tar_path, result,
                      f", and {output_path} from an earlier conversion is removed" if stale else "")
    else:
      samples.update(result)
  skipped = {reason: samples[reason] for reason in ("no_image", "no_caption") if samples[reason]}
  stats = {
      "shards_read": len(jobs) - len(skipped_shards),
      "shards_skipped": len(skipped_shards),
      "skipped_shards": skipped_shards,
      "samples_written": samples["written"],
      "samples_skipped": sum(skipped.values()),
      "samples_skipped_by_reason": skipped,
      "samples_with_unreadable_json": samples["bad_json"],  # written, with their caption from the .txt
  }
  stats_path = os.path.join(output_dir, "conversion_stats.json")
  with open(stats_path + _TMP_SUFFIX, "w") as f:
    json.dump(stats, f, indent=2)
  os.replace(stats_path + _TMP_SUFFIX, stats_path)
  if not stats["shards_read"]:
    raise ValueError(f"None of the {len(jobs)} shards matching {input_pattern!r} could be read (first: "
                     f"{next(iter(skipped_shards.values()))}); see {stats_path}.")
  return stats


def main(argv):
  del argv
  try:
    stats = convert(_INPUT.value, _OUTPUT.value, _NUM_WORKERS.value)
  except (FileNotFoundError, ValueError) as e:  # the message says it all
    raise SystemExit(f"Error: {e}") from None
  print(json.dumps(stats, indent=2))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  _INPUT = flags.DEFINE_string("input", None, "Glob of webdataset .tar shards (comma-separate several).",
                               required=True)
  _OUTPUT = flags.DEFINE_string("output", None, "Folder for the .array_record files.", required=True)
  _NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Shards converted in parallel.")
  app.run(main)
