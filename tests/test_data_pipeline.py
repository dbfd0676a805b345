"""Training pipeline: batch contract, determinism, exact resume, process sharding, worker processes, eval batches."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from sycoca_jax import data
from sycoca_jax.data import pipeline
from sycoca_jax.data import scenes


def _config(**overrides):
  cfg = data.default_data_config()
  cfg.num_threads = 1
  cfg.scenes.num_train = 40  # small, so that a few batches cross epoch boundaries
  cfg.update(overrides)
  return cfg


def _with(cfg, **overrides):
  cfg = cfg.copy_and_resolve_references()
  cfg.update(overrides)
  return cfg


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contract():
  cfg = _config()
  it = data.build_train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert set(batch) == {"image", "text", "example_id"}
  assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
  assert batch["text"].shape == (8, 32) and batch["text"].dtype == np.int32
  assert batch["example_id"].shape == (8,) and batch["example_id"].dtype == np.int32
  # Undoing CLIP's normalisation gives back 8-bit pixel values.
  pixels = batch["image"] * np.asarray(data.CLIP_STD) * 255 + np.asarray(data.CLIP_MEAN) * 255
  assert pixels.min() > -0.01 and pixels.max() < 255.01
  np.testing.assert_allclose(pixels, np.round(pixels), atol=2e-3)
  tok = data.tokenizer_from_config(cfg)
  for row, example_id in zip(batch["text"], batch["example_id"]):
    end = int(np.argmax(row == tok.eos_id))
    assert row[0] == tok.bos_id and end > 1 and not row[end + 1:].any()
    caption = tok.decode(row)[0]
    assert caption in [tok.normalize(c) for c in scenes.ScenesSource("train")[int(example_id)]["captions"]]


def test_deterministic_given_seed():
  cfg = _config()
  a = _take(data.build_train_iterator(cfg, global_batch_size=8, seed=1, process_index=0, process_count=1), 3)
  b = _take(data.build_train_iterator(cfg, global_batch_size=8, seed=1, process_index=0, process_count=1), 3)
  c = _take(data.build_train_iterator(cfg, global_batch_size=8, seed=2, process_index=0, process_count=1), 3)
  _assert_same_batches(a, b)
  assert not np.array_equal(a[0]["example_id"], c[0]["example_id"])


def test_resumed_iterator_yields_the_same_batches():
  cfg = _config()
  make = lambda: data.build_train_iterator(cfg, global_batch_size=16, seed=0, process_index=0, process_count=1)
  uninterrupted = make()
  _take(uninterrupted, 2)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # states go into checkpoints as JSON
  expected = _take(uninterrupted, 4)  # 2 + 4 batches of 16 cross the 40-example epoch boundary twice
  resumed = make()
  _take(resumed, 1)  # a different position, to show set_state really moves it
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 4), expected)


def test_every_epoch_covers_the_data_once_in_a_new_order():
  cfg = _config()
  it = data.build_train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1)
  ids = np.concatenate([b["example_id"] for b in _take(it, 10)])  # 80 = two epochs of 40
  assert sorted(ids[:40]) == list(range(40)) and sorted(ids[40:]) == list(range(40))
  assert not np.array_equal(ids[:40], ids[40:])


def test_processes_read_disjoint_blocks_of_the_same_global_batches():
  cfg = _config()
  single = _take(data.build_train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1), 5)
  per_process = []
  for process_index in range(2):
    it = data.build_train_iterator(cfg, global_batch_size=8, seed=0, process_index=process_index,
                                   process_count=2)
    batches = _take(it, 5)  # 5 global batches of 8 = one epoch of the 40 examples
    assert all(b["image"].shape[0] == 4 for b in batches)
    per_process.append(batches)
  ids = [{int(i) for b in batches for i in b["example_id"]} for batches in per_process]
  assert not ids[0] & ids[1]
  assert ids[0] | ids[1] == set(range(40))
  # Process p holds rows [4p, 4p + 4) of the global batch a single process would have built.
  for step, whole in enumerate(single):
    for key in ("image", "text", "example_id"):
      joined = np.concatenate([per_process[0][step][key], per_process[1][step][key]])
      np.testing.assert_array_equal(joined, whole[key])
  with pytest.raises(ValueError, match="divisible"):
    data.build_train_iterator(cfg, global_batch_size=7, seed=0, process_index=0, process_count=2)


def _coco_with_bad_files(directory, num_images=10):
  """A COCO captions file over small PNGs of distinct colours, two of them corrupt and one missing."""
  images, annotations = [], []
  for i in range(num_images):
    name = f"{i}.png"
    if i == 3:
      (directory / name).write_bytes(b"not a png")
    elif i != 7:  # 7 is missing
      buffer = io.BytesIO()
      Image.new("RGB", (20, 16), (20 * i, 255 - 20 * i, 99)).save(buffer, "PNG")
      (directory / name).write_bytes(buffer.getvalue() if i != 5 else buffer.getvalue()[:40])  # 5: truncated
    images.append({"id": i, "file_name": name})
    annotations += [{"image_id": i, "id": 10 * i + k, "caption": f"picture {i} caption {k}"} for k in range(3)]
  (directory / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
  return _config(name="coco_json", path=str(directory / "captions.json"), image_dir=str(directory), image_size=16,
                 tokenizer="clip_bpe", max_len=12, flip=True)


def test_worker_processes_give_the_same_stream_skip_counts_and_exact_resume(tmp_path, monkeypatch):
  """Decoding in 2 worker processes changes nothing: batches, skip counts, states; and resume stays exact."""
  cfg = _coco_with_bad_files(tmp_path)

  def make(num_workers):
    return data.build_train_iterator(_with(cfg, num_workers=num_workers), global_batch_size=4, seed=0,
                                     process_index=0, process_count=1)

  in_process = make(0)
  want = _take(in_process, 6)  # 24 of the 7 usable examples per epoch: three epoch boundaries crossed
  want_state = in_process.get_state()
  assert want_state["skipped"]["corrupt_image"] >= 6 and want_state["skipped"]["missing_file"] >= 3

  uninterrupted = make(2)
  got = _take(uninterrupted, 2)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # states go into checkpoints as JSON
  assert state["pipeline"]["next_index"] % 4  # skips so far: the resume starts inside a worker's chunk
  got += _take(uninterrupted, 4)
  _assert_same_batches(got, want)
  assert uninterrupted.get_state() == want_state and uninterrupted.stats == in_process.stats
  uninterrupted.close()

  resumed = make(2)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 4), want[2:])
  assert resumed.get_state() == want_state
  resumed.close()
  # The state does not name the workers: a checkpoint written with 2 resumes without any.
  elsewhere = make(0)
  elsewhere.set_state(state)
  _assert_same_batches(_take(elsewhere, 4), want[2:])
  # Nor do the batches depend on how many examples a worker hands over at once (here 2 instead of the batch).
  monkeypatch.setattr(pipeline, "_CHUNK_BYTES", 2 * 4 * (3 * 16**2 + 12 + 1))
  assert pipeline._chunk_size(4, 4 * (3 * 16**2 + 12 + 1)) == 2
  _assert_same_batches(_take(make(0), 6), want)


def test_automatic_worker_count():
  cfg = _config()
  assert cfg.num_workers == -1 and pipeline.resolve_num_workers(cfg) == 0  # the scenes decode in-process
  cfg.update(name="webdataset_array_record")
  assert pipeline.resolve_num_workers(cfg) == max(1, pipeline.available_cores() - 1)
  cfg.num_workers = 3
  assert pipeline.resolve_num_workers(cfg) == 3
  cfg.num_workers = -2
  with pytest.raises(ValueError, match="num_workers"):
    pipeline.resolve_num_workers(cfg)


def test_flip_mirrors_image_and_swaps_left_right():
  assert pipeline.swap_left_right("a star left of a circle, on the Right") == "a star right of a circle, on the Left"
  no_crop = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
  plain = next(data.build_train_iterator(_config(**no_crop), global_batch_size=16, seed=0, process_index=0,
                                         process_count=1))
  flipped = next(data.build_train_iterator(_config(flip=True, **no_crop), global_batch_size=16, seed=0,
                                           process_index=0, process_count=1))
  tok = data.tokenizer_from_config(_config())
  mirrored = 0
  for i in range(16):
    if np.array_equal(flipped["image"][i], plain["image"][i]):
      np.testing.assert_array_equal(flipped["text"][i], plain["text"][i])
    else:
      np.testing.assert_array_equal(flipped["image"][i], plain["image"][i][:, ::-1])
      assert tok.decode(flipped["text"][i]) == [pipeline.swap_left_right(tok.decode(plain["text"][i])[0])]
      mirrored += 1
  assert 0 < mirrored < 16


def test_eval_batches_are_padded_masked_and_split_across_processes():
  cfg = _config()
  split = data.load_eval_split(cfg, "zeroshot_digit")
  assert len(split) == 500 and split.class_names == scenes.DIGITS and split.labels.shape == (500,)
  assert split.captions is not None and split.scene_graphs is not None
  seen, counts = [], []
  for process_index in range(2):
    batches = list(split.batches(192, process_index=process_index, process_count=2))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (96, 64, 64, 3)
      assert ((b["index"] >= 0) == b["mask"]).all()
      seen += b["index"][b["mask"]].tolist()
  assert counts == [3, 3]
  assert sorted(seen) == list(range(500))
  source = scenes.ScenesSource("zeroshot_digit")
  np.testing.assert_array_equal(split.image(7), pipeline.normalize(pipeline.Image.fromarray(source[7]["image"])))


def test_scenes_test_split_has_five_captions_and_graphs():
  split = data.load_eval_split(_config(), "test")
  assert len(split) == 1000 and all(len(c) == 5 for c in split.captions)
  assert len(split.scene_graphs) == 1000 and split.qa[0] and split.labels is None
