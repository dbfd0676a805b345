"""Training pipeline: batch contract, determinism, exact resume, process sharding, worker processes, eval batches."""

import collections
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from sycoca_jax import data
from sycoca_jax.data import pipeline
from sycoca_jax.data import prefetch
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
  assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.uint8  # normalised on the device
  assert batch["text"].shape == (8, 32) and batch["text"].dtype == np.int32
  assert batch["example_id"].shape == (8,) and batch["example_id"].dtype == np.int32
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


@pytest.mark.slow(reason="spawns the input pipeline's worker processes, twice: ~5 s")
def test_worker_processes_give_the_same_stream_skip_counts_and_exact_resume(tmp_path, monkeypatch):
  """Decoding in 2 worker processes changes nothing: batches, skip counts, states; and resume stays exact, with
  device prefetch queueing batches past the one a checkpoint is taken after, and skips before it."""
  cfg = _coco_with_bad_files(tmp_path)

  def make(num_workers):
    return data.build_train_iterator(_with(cfg, num_workers=num_workers), global_batch_size=4, seed=0,
                                     process_index=0, process_count=1)

  in_process = make(0)
  want = _take(in_process, 6)  # 24 examples of 10 records, 3 unusable: substitutes fill their rows
  want_state = in_process.get_state()
  assert want_state["skipped"]["corrupt_image"] >= 4 and want_state["skipped"]["missing_file"] >= 2
  assert not set(np.concatenate([b["example_id"] for b in want]).tolist()) & {3, 5, 7}

  uninterrupted = prefetch.DevicePrefetcher(make(2), put=jax.device_put, size=2)
  got = _take(uninterrupted, 2)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # states go into checkpoints as JSON
  assert state["pipeline"]["next_index"] == 8 and state["skipped"]  # after skips, not after the queued batches
  got += _take(uninterrupted, 4)
  _assert_same_batches(jax.device_get(got), want)
  assert uninterrupted.get_state() == want_state and uninterrupted.stats == in_process.stats
  uninterrupted.close()

  resumed = prefetch.DevicePrefetcher(make(2), put=jax.device_put, size=2)
  resumed.set_state(state)
  _assert_same_batches(jax.device_get(_take(resumed, 4)), want[2:])
  assert resumed.get_state() == want_state
  resumed.close()
  # The state does not name the workers: a checkpoint written with 2 resumes without any.
  elsewhere = make(0)
  elsewhere.set_state(state)
  _assert_same_batches(_take(elsewhere, 4), want[2:])
  # Nor do the batches depend on how many examples a worker hands over at once (here 2 instead of the batch).
  example_bytes = pipeline.example_bytes_of(cfg)
  monkeypatch.setattr(pipeline, "_CHUNK_BYTES", 2 * example_bytes)
  assert pipeline._chunk_size(4, example_bytes) == 2
  _assert_same_batches(_take(make(0), 6), want)


def test_a_skip_is_replaced_inside_its_chunk_so_batches_stay_whole_chunks(tmp_path):
  """Every chunk row is usable and batch j is exactly chunk j (same arrays, no copy), skips or not."""
  cfg = _coco_with_bad_files(tmp_path)
  it = data.build_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
  chunks = []
  for j in range(6):
    batch = next(it)
    chunk = it._chunk  # pylint: disable=protected-access
    assert it._chunk_start == 4 * j and it.get_state()["pipeline"]["next_index"] == 4 * (j + 1)
    for key in ("image", "text", "example_id"):
      assert batch[key] is chunk[key] or np.shares_memory(batch[key], chunk[key])  # handed over as it is
    chunks.append(chunk)
  reasons = [r for chunk in chunks for row in chunk["skip"] for r in row]
  assert reasons and collections.Counter(reasons) == it.get_state()["skipped"]
  # A row with skips holds a usable substitute: a good record, with its image and caption.
  rows = [(chunk, i) for chunk in chunks for i, row in enumerate(chunk["skip"]) if row]
  for chunk, i in rows:
    assert int(chunk["example_id"][i]) not in (3, 5, 7) and chunk["image"][i].any() and chunk["text"][i][0]


def test_automatic_worker_count(monkeypatch):
  cfg = _config()
  assert cfg.num_workers == -1 and pipeline.resolve_num_workers(cfg) == 0  # the scenes decode in-process
  cfg.update(name="webdataset_array_record")
  monkeypatch.setattr(pipeline, "available_cores", lambda: 64)
  gib = 2**30
  monkeypatch.setattr(pipeline, "_available_memory", lambda: (64 * gib, 8 * gib))
  # The need over one worker's rate, plus one: 512 x 8 steps/s at 500 examples/s per worker -> 9 + 1.
  need = pipeline.WorkerNeed(examples_per_sec=512 * 8, worker_rate=500, chunk_bytes=gib // 8)
  assert pipeline.resolve_num_workers(cfg, need) == 10
  # Bounded by the cores (one kept for the training loop) ...
  monkeypatch.setattr(pipeline, "available_cores", lambda: 4)
  assert pipeline.resolve_num_workers(cfg, need) == 3
  monkeypatch.setattr(pipeline, "available_cores", lambda: 64)
  # ... by memory (half of what is available, num_threads + 2 chunks each) ...
  monkeypatch.setattr(pipeline, "_available_memory", lambda: (2 * gib, 8 * gib))
  assert pipeline.resolve_num_workers(cfg, need) == 2
  # ... and by /dev/shm (two chunks each), with a message that says what to change.
  monkeypatch.setattr(pipeline, "_available_memory", lambda: (64 * gib, gib // 2))
  assert pipeline.resolve_num_workers(cfg, need) == 2
  cfg.num_workers = 3
  with pytest.raises(ValueError, match=r"/dev/shm has 512 MiB free.*--shm-size"):
    pipeline.resolve_num_workers(cfg, need)
  cfg.num_workers = 2
  assert pipeline.resolve_num_workers(cfg, need) == 2
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


def test_each_caption_comes_with_its_own_twin_flipped_alike():
  cfg = _config(flip=True)
  cfg.scenes.hard_negatives = ("object", "relation")
  batch = next(data.build_train_iterator(cfg, global_batch_size=16, seed=0, process_index=0, process_count=1))
  assert batch["hard_negative"].shape == batch["text"].shape and batch["hard_negative"].dtype == np.int32
  tok = data.tokenizer_from_config(cfg)
  source = scenes.ScenesSource("train", hard_negatives=("object", "relation"))
  pairs = {}
  for example_id in batch["example_id"]:
    element = source[int(example_id)]
    for caption, twin in zip(element["captions"], element["hard_negatives"]):
      for swap in (lambda t: t, pipeline.swap_left_right):  # as it was drawn, or mirrored with the image
        pairs[tok.normalize(swap(caption))] = tok.normalize(swap(twin))
  for text, twin in zip(batch["text"], batch["hard_negative"]):
    assert tok.decode(twin)[0] == pairs[tok.decode(text)[0]]
  assert (batch["hard_negative"] != batch["text"]).any(axis=1).sum() >= 12
  assert "hard_negative" not in next(data.build_train_iterator(_config(), global_batch_size=8, seed=0,
                                                               process_index=0, process_count=1))


def test_twin_scenes_sit_side_by_side_in_every_process_slice_and_epoch():
  """data.scenes.twins: rows 2j and 2j + 1 of a batch are a scene and its twin (records 2i, 2i + 1), each with its
  own caption; one process or two see the same global batches; every pair once per epoch."""
  cfg = _config()
  cfg.scenes.twins = True  # 40 scenes -> 80 records, 10 batches of 8 per epoch
  tok = data.tokenizer_from_config(cfg)
  source = scenes.ScenesSource("train", num_examples=40, twins=True)
  single = _take(data.build_train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1), 11)
  for batch in single:
    ids = batch["example_id"]
    assert (ids[0::2] % 2 == 0).all() and (ids[1::2] == ids[0::2] + 1).all()
    for row, example_id in enumerate(ids):
      (caption,) = source[int(example_id)]["captions"]
      assert tok.decode(batch["text"][row : row + 1])[0] == tok.normalize(caption)
  assert sorted(i for b in single[:10] for i in b["example_id"].tolist()) == list(range(80))
  assert single[10]["example_id"].tolist() != single[0]["example_id"].tolist()  # the next epoch: a new order
  per_process = [_take(data.build_train_iterator(cfg, global_batch_size=8, seed=0, process_index=p,
                                                 process_count=2), 3) for p in range(2)]
  for step in range(3):
    for key in ("image", "text", "example_id"):
      np.testing.assert_array_equal(np.concatenate([per_process[0][step][key], per_process[1][step][key]]),
                                    single[step][key])
  with pytest.raises(ValueError, match="config.data.scenes.twins: .*must be even"):
    data.build_train_iterator(cfg, global_batch_size=6, seed=0, process_index=0, process_count=2)


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
  np.testing.assert_array_equal(split.image(7), source[7]["image"])


def test_scenes_test_split_has_five_captions_and_graphs():
  split = data.load_eval_split(_config(), "test")
  assert len(split) == 1000 and all(len(c) == 5 for c in split.captions)
  assert len(split.scene_graphs) == 1000 and split.qa[0] and split.labels is None
