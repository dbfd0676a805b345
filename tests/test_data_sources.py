"""Real-data readers and bad input: COCO / Karpathy JSON, TFDS, webdataset -> array_record, skipped examples."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from sycoca_jax import data
from sycoca_jax.data import pipeline
from sycoca_jax.data import sources


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kw)
  return buffer.getvalue()


def _solid(value: int, size=(40, 30)) -> Image.Image:
  """An RGB image whose colour encodes `value`, so a batch row can be traced back to its file."""
  return Image.new("RGB", size, (value, 255 - value, 128))


def _decoded_value(batch_image: np.ndarray) -> float:
  return float(np.asarray(batch_image, np.float64)[..., 0].mean())  # uint8 pixels


# ------------------------------------------------------------------------------------------------ decoding


def test_pixel_formats_decode_to_correct_rgb():
  grey = Image.fromarray(np.full((8, 8), 77, np.uint8))
  assert np.asarray(pipeline.decode_image(_encode(grey, "PNG")))[0, 0].tolist() == [77, 77, 77]

  sixteen = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))  # mode I;16
  assert sixteen.mode.startswith("I;16")
  decoded = np.asarray(pipeline.decode_image(_encode(sixteen, "PNG")))
  assert decoded[0, :, 0].tolist() == [0, 128, 255]  # scaled, not clipped to white

  rgba = Image.new("RGBA", (4, 4), (200, 10, 10, 255))
  rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
  decoded = np.asarray(pipeline.decode_image(_encode(rgba, "PNG")))
  assert decoded[0, 0].tolist() == [255, 255, 255] and decoded[1, 1].tolist() == [200, 10, 10]

  cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
  decoded = np.asarray(pipeline.decode_image(_encode(cmyk, "JPEG", quality=95)))
  assert decoded[..., 0].min() > 230 and decoded[..., 1:].max() < 30

  palette = _solid(90).convert("P")
  assert pipeline.decode_image(_encode(palette, "PNG")).mode == "RGB"

  with pytest.raises(sources.BadExample, match="unsupported_image_mode"):
    pipeline.to_rgb(Image.new("F", (2, 2)))
  for bad in (b"", b"not an image at all", _encode(_solid(10), "JPEG")[:200]):  # empty, garbage, truncated
    with pytest.raises(sources.BadExample) as e:
      pipeline.decode_image(bad)
    assert e.value.reason == "corrupt_image"


# ------------------------------------------------------------------------------------------------ COCO JSON


GOOD = {  # file -> (encoded image, colour value)
    "good.jpg": (lambda: _encode(_solid(20), "JPEG", quality=98), 20),
    "grey.png": (lambda: _encode(Image.new("L", (30, 40), 60), "PNG"), 60),
    "rgba.png": (lambda: _encode(Image.new("RGBA", (32, 32), (100, 155, 128, 255)), "PNG"), 100),
    "cmyk.jpg": (lambda: _encode(_solid(140).convert("CMYK"), "JPEG", quality=98), 140),
    "deep.png": (lambda: _encode(Image.fromarray(np.full((20, 20), 180 * 257, np.uint16)), "PNG"), 180),
    "long.png": (lambda: _encode(_solid(220), "PNG"), 220),
}
BAD = {  # file -> reason it is skipped
    "corrupt.jpg": "corrupt_image", "truncated.jpg": "corrupt_image", "missing.jpg": "missing_file",
    "nocaption.png": "empty_caption",
}


@pytest.fixture
def coco_dir(tmp_path):
  """A COCO-format caption file over good and bad images, 5 captions each."""
  images, annotations = [], []
  files = list(GOOD) + list(BAD)
  for image_id, name in enumerate(files):
    if name in GOOD:
      (tmp_path / name).write_bytes(GOOD[name][0]())
    captions = [f"image {name} caption {k}" for k in range(5)]
    if name == "long.png":
      captions = [" ".join(["word"] * 500)] * 5
    if name == "nocaption.png":
      captions = ["", "  "]
    images.append({"id": image_id, "file_name": name})
    annotations += [{"image_id": image_id, "id": 100 * image_id + k, "caption": c} for k, c in enumerate(captions)]
  (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  (tmp_path / "truncated.jpg").write_bytes(_encode(_solid(30, (64, 64)), "JPEG")[:300])
  (tmp_path / "nocaption.png").write_bytes(_encode(_solid(40), "PNG"))
  (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
  return tmp_path


def _coco_config(directory, **overrides):
  cfg = data.default_data_config()
  # num_workers=0: decode in this process, as worker start-up costs seconds; test_data_pipeline covers workers.
  cfg.update({"name": "coco_json", "path": str(directory / "captions.json"), "image_dir": str(directory),
              "tokenizer": "clip_bpe", "max_len": 16, "image_size": 32, "num_threads": 1, "num_workers": 0,
              "crop_scale": (1.0, 1.0), "crop_ratio": (0.5, 2.0)} | overrides)
  return cfg


def test_coco_fixture_loads_with_five_captions(coco_dir):
  split = data.load_eval_split(_coco_config(coco_dir), "val")
  assert len(split) == len(GOOD) + len(BAD)
  assert split.captions[0] == [f"image good.jpg caption {k}" for k in range(5)]
  assert all(len(c) == 5 for c, name in zip(split.captions, list(GOOD) + list(BAD)) if name != "nocaption.png")
  batch = next(split.batches(16, process_index=0, process_count=1))
  names = list(GOOD) + list(BAD)
  for row, name in enumerate(names):  # bad images come back masked, good ones with their colour
    assert batch["mask"][row] == (name in GOOD or name == "nocaption.png"), name
    if name in GOOD:
      assert abs(_decoded_value(batch["image"][row]) - GOOD[name][1]) < 3, name


def _at_least(stats, counts):
  return all(stats.get(f"skipped/{reason}", 0) >= n for reason, n in counts.items()) and stats["skipped"] == sum(
      v for k, v in stats.items() if k.startswith("skipped/"))


def test_bad_examples_are_replaced_and_counted_and_resume(coco_dir):
  cfg = _coco_config(coco_dir)
  make = lambda: data.build_train_iterator(cfg, global_batch_size=5, seed=0, process_index=0, process_count=1)
  it = make()
  first_epoch = [next(it), next(it)]  # 10 positions = one epoch: every record met once at its own position
  ids = {int(i) for b in first_epoch for i in b["example_id"]}
  assert ids == set(range(len(GOOD)))  # the bad ones (ids 6-9) replaced by substitutes, good ones all there
  # Each bad record counted (a substitute that is bad too is counted as well).
  assert _at_least(it.stats, {"corrupt_image": 2, "empty_caption": 1, "missing_file": 1})
  for batch in first_epoch:  # every kept example is decoded right: colour and caption match the file
    for image, text, example_id in zip(batch["image"], batch["text"], batch["example_id"]):
      name = list(GOOD)[example_id]
      assert abs(_decoded_value(image) - GOOD[name][1]) < 3, name
      assert text[-1] == 49407 if name == "long.png" else 49407 in text  # overlong: truncated, keeps eot
  state, stats = it.get_state(), it.stats
  expected = [next(it), next(it)]
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))
  assert resumed.stats == stats  # the counters are part of the state
  for a, b in zip(expected, [next(resumed), next(resumed)]):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])
  assert resumed.stats == it.stats and _at_least(it.stats, {"corrupt_image": 4, "empty_caption": 2,
                                                            "missing_file": 2})


def test_all_bad_data_fails_fast_with_a_reason(coco_dir):
  cfg = _coco_config(coco_dir, image_dir=str(coco_dir / "nowhere"), max_consecutive_skips=20)
  it = data.build_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
  with pytest.raises(RuntimeError, match="missing_file"):
    next(it)


def test_karpathy_split_file(tmp_path):
  (tmp_path / "train2014").mkdir()
  entries = []
  for k, split in enumerate(["train", "restval", "val", "test", "test"]):
    _solid(10 * k).save(tmp_path / "train2014" / f"{k}.jpg")
    entries.append({"filepath": "train2014", "filename": f"{k}.jpg", "split": split,
                    "sentences": [{"raw": f"picture {k} number {j}"} for j in range(5)]})
  (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
  cfg = _coco_config(tmp_path, path=str(tmp_path / "dataset_coco.json"))
  assert len(sources.build_source(cfg, "train")) == 2  # train + restval
  test = data.load_eval_split(cfg, "test")
  assert len(test) == 2 and test.captions[1][4] == "picture 4 number 4"
  with pytest.raises(ValueError, match="no images for split 'dev'"):
    sources.build_source(cfg, "dev")


def test_missing_datasets_fail_clearly(tmp_path, monkeypatch):
  cfg = _coco_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="captions.json"):
    data.load_eval_split(cfg, "val")
  cfg = _coco_config(tmp_path, name="webdataset_array_record", path=str(tmp_path / "*.array_record"))
  with pytest.raises(FileNotFoundError, match=r"No \.array_record files match .*\*\.array_record"):
    data.build_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
  # A data_dir without the dataset's folder fails before TFDS (and TensorFlow) is asked.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(tfds, "data_source", lambda name, **kwargs: calls.append(name) or 1 / 0)
  cfg = _coco_config(tmp_path, name="tfds", tfds_name="coco_captions/2014:1.1.0", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=f"'coco_captions/2014:1.1.0' split 'test'.*{tmp_path}: no folder "
                                              f"{tmp_path / 'coco_captions'}"):
    data.load_eval_split(cfg, "test")
  assert not calls
  # With the folder there, whatever TFDS raises (here: it cannot open the split) arrives in the same form.
  (tmp_path / "coco_captions").mkdir()
  with pytest.raises(FileNotFoundError, match=f"'coco_captions/2014:1.1.0' split 'test'.*{tmp_path}: division by "
                                              "zero. Prepare it there with `tfds build"):
    data.load_eval_split(cfg, "test")
  assert calls == ["coco_captions/2014:1.1.0"]


# ------------------------------------------------------------------------------------------------ TFDS


def test_tfds_source_reads_captions_and_labels(monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class FakeInfo:
    features = {"label": tfds.features.ClassLabel(names=["cat", "dog"])}

  class FakeDataSource(list):
    dataset_info = FakeInfo()

  coco = FakeDataSource([{"image": _encode(_solid(10 * i), "JPEG"), "image/id": i,
                          "captions": {"id": np.arange(5), "text": np.array([f"cap {i} {j}".encode() for j in range(5)])}}
                         for i in range(3)])
  imagenet = FakeDataSource([{"image": _encode(_solid(i), "PNG"), "label": np.int64(i % 2)} for i in range(4)])
  calls = []

  def fake_data_source(name, *, split, data_dir, download, decoders):
    calls.append((name, split, data_dir, download))
    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
    return coco if name == "coco_captions" else imagenet

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  cfg = data.default_data_config()
  cfg.update(name="tfds", tfds_name="coco_captions", image_size=16, num_threads=1, num_workers=0)
  test = data.load_eval_split(cfg, "test")
  assert test.captions[2] == [f"cap 2 {j}" for j in range(5)] and test.labels is None
  batch = next(data.build_train_iterator(cfg, global_batch_size=3, seed=0, process_index=0, process_count=1))
  assert batch["image"].shape == (3, 16, 16, 3)
  cfg.tfds_name = "imagenet2012"
  val = data.load_eval_split(cfg, "validation")
  assert val.class_names == ("cat", "dog") and val.labels.tolist() == [0, 1, 0, 1]
  assert calls[0] == ("coco_captions", "test", None, False)


# ------------------------------------------------------------------------------------------------ webdataset


def _write_shard(path, samples):
  with tarfile.open(path, "w") as tar:
    for name, payload in samples:
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))


def test_webdataset_to_array_record_to_batches(tmp_path):
  shards = tmp_path / "shards"
  shards.mkdir()
  value_of_caption = {}
  for s in range(2):
    samples = []
    for k in range(5):
      key, value = f"{s:05d}{k:04d}", 20 * (5 * s + k)
      caption = f"photo number {5 * s + k}"
      value_of_caption[caption] = value
      samples.append((f"{key}.jpg", _encode(_solid(value, (48, 36)), "JPEG", quality=98)))
      if k % 2:  # img2dataset writes the caption in .txt and in .json; some sets only in .json
        samples.append((f"{key}.txt", caption.encode()))
      samples.append((f"{key}.json", json.dumps({"caption": caption, "url": "http://x", "key": key}).encode()))
    samples += [("0999999.txt", b"caption without an image"), ("0999998.jpg", _encode(_solid(1), "JPEG")),
                ("0999997.jpg", b"corrupt bytes"), ("0999997.txt", b"a corrupt image")]
    _write_shard(shards / f"{s:05d}.tar", samples)
  out = tmp_path / "records"
  result = subprocess.run(
      [sys.executable, "-m", "sycoca_jax.data.webdataset", f"--input={shards}/*.tar", f"--output={out}"],
      capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr
  stats = json.loads((out / "conversion_stats.json").read_text())
  assert stats == {"shards_read": 2, "shards_skipped": 0, "skipped_shards": {}, "samples_written": 12,
                   "samples_skipped": 4, "samples_skipped_by_reason": {"no_image": 2, "no_caption": 2},
                   "samples_with_unreadable_json": 0}
  assert sorted(os.listdir(out)) == ["00000.array_record", "00001.array_record", "conversion_stats.json"]

  cfg = data.default_data_config()
  cfg.update(name="webdataset_array_record", path=str(out / "*.array_record"), tokenizer="clip_bpe",
             max_len=16, image_size=24, num_threads=1, num_workers=0, crop_scale=(1.0, 1.0),
             crop_ratio=(0.5, 2.0))
  it = data.build_train_iterator(cfg, global_batch_size=6, seed=0, process_index=0, process_count=1)
  batches = [next(it), next(it)]  # 12 positions: one epoch of the 12 records, 2 of them corrupt and replaced
  assert set(it.stats) == {"skipped", "skipped/corrupt_image"} and it.stats["skipped"] >= 2
  tok = data.tokenizer_from_config(cfg)
  seen = set()
  for batch in batches:
    for image, text in zip(batch["image"], batch["text"]):
      caption = tok.decode(text)[0]
      assert abs(_decoded_value(image) - value_of_caption[caption]) < 3, caption  # pairs stay together
      seen.add(caption)
  assert seen == set(value_of_caption)


# ------------------------------------------------------------------------------------------------ offline sets


def test_offline_eval_sets_under_any_config(coco_dir):
  cfg = _coco_config(coco_dir)  # not scenes: these splits do not depend on the configured dataset
  digits = data.load_eval_split(cfg, "sklearn_digits")
  assert len(digits) == 1797 and digits.class_names[digits.labels[9]] == "9" and "{}" in digits.templates[0]
  image = digits.image(0)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.std() > 20  # pixels, not a blank
  faces = data.load_eval_split(cfg, "lfw_subset")
  assert len(faces) == 200 and faces.labels.tolist() == [1] * 100 + [0] * 100 and faces.class_names[1] == "face"
  vqa = data.load_eval_split(cfg, "easy_vqa_test")
  assert len(vqa) == 1000 and sum(len(q) for q in vqa.qa) == 9673
  assert all(a in vqa.answers for pairs in vqa.qa for _, a in pairs)
  assert next(vqa.batches(8, process_index=0, process_count=1))["mask"].all()
