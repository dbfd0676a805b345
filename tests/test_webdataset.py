"""The webdataset -> array_record converter with bad input: unreadable shards, interruptions, its statistics."""

import io
import json
import logging
import os
import subprocess
import sys
import tarfile

import pytest

from sycoca_jax.data import webdataset
from tests.helpers import ROOT


def _write_shard(path, num_samples, first=0):
  """A tar of `num_samples` samples (KEY.jpg with 3000 bytes, KEY.txt), as img2dataset writes them."""
  with tarfile.open(path, "w") as tar:
    for k in range(first, first + num_samples):
      for name, payload in ((f"{k:09d}.jpg", bytes([k % 256]) * 3000), (f"{k:09d}.txt", f"caption {k}".encode())):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def _num_records(path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    return reader.num_records()
  finally:
    reader.close()


def test_bad_shards_are_skipped_named_and_counted(tmp_path, caplog):
  shards, out = tmp_path / "shards", tmp_path / "out"
  shards.mkdir()
  _write_shard(shards / "00000.tar", 4)
  _write_shard(shards / "00001.tar", 4, first=4)
  with open(shards / "00002.tar", "w") as f:
    f.write("an HTML error page saved under a .tar name\n" * 20)
  with tarfile.open(shards / "00003.tar", "w") as tar:  # one sample without a caption, one without an image
    for name in ("000000008.jpg", "000000009.txt"):
      info = tarfile.TarInfo(name)
      info.size = 3
      tar.addfile(info, io.BytesIO(b"abc"))
  webdataset.convert(f"{shards}/00001.tar", str(out))  # an earlier conversion, from a good copy of the shard
  data = (shards / "00001.tar").read_bytes()
  (shards / "00001.tar").write_bytes(data[: len(data) // 2])  # a download cut off inside a member

  with caplog.at_level(logging.WARNING):
    stats = webdataset.convert(f"{shards}/*.tar", str(out))
  assert stats == {
      "shards_read": 2, "shards_skipped": 2,
      "skipped_shards": {str(shards / "00001.tar"): "ReadError: unexpected end of data",
                         str(shards / "00002.tar"): "ReadError: invalid header"},
      "samples_written": 4, "samples_skipped": 2, "samples_skipped_by_reason": {"no_image": 1, "no_caption": 1},
      "samples_with_unreadable_json": 0}
  assert json.loads((out / "conversion_stats.json").read_text()) == stats
  assert f"Skipped shard {shards / '00001.tar'} (ReadError: unexpected end of data)" in caplog.text
  assert f"{out / '00001.array_record'} from an earlier conversion is removed" in caplog.text
  assert f"Skipped shard {shards / '00002.tar'}" in caplog.text
  # Only whole files remain, and only of the shards counted as read.
  assert sorted(os.listdir(out)) == ["00000.array_record", "00003.array_record", "conversion_stats.json"]
  assert _num_records(out / "00000.array_record") == 4 and _num_records(out / "00003.array_record") == 0


def test_an_interrupted_conversion_leaves_no_partial_output(tmp_path, monkeypatch):
  _write_shard(tmp_path / "00000.tar", 4)
  written, serialize = [], webdataset.serialize_record

  def interrupted_after_two(key, *args, **kwargs):  # as Ctrl-C (or a full disk) would, mid-shard
    if len(written) == 2:
      raise KeyboardInterrupt
    written.append(key)
    return serialize(key, *args, **kwargs)

  monkeypatch.setattr(webdataset, "serialize_record", interrupted_after_two)
  with pytest.raises(KeyboardInterrupt):
    webdataset.convert(str(tmp_path / "00000.tar"), str(tmp_path / "out"))
  assert written == ["000000000", "000000001"] and os.listdir(tmp_path / "out") == []


def test_no_readable_shard_fails_in_one_line_with_its_statistics(tmp_path):
  (tmp_path / "00000.tar").write_bytes(b"")
  result = subprocess.run(
      [sys.executable, "-m", "sycoca_jax.data.webdataset", f"--input={tmp_path}/*.tar", f"--output={tmp_path}/out"],
      capture_output=True, text=True, check=False, cwd=ROOT)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: None of the 1 shards matching") and "ReadError: empty file" in last, result.stderr
  stats = json.loads((tmp_path / "out" / "conversion_stats.json").read_text())
  assert stats["shards_read"] == 0 and stats["skipped_shards"] == {str(tmp_path / "00000.tar"): "ReadError: empty file"}
