"""A gs:// workdir is used as a bucket: train -> checkpoint -> resume -> eval against a fake Cloud Storage.

The fake keeps bucket BUCKET's objects as files under ROOT/BUCKET and serves them to every client the trainer
reaches a workdir through, each by its own route, as on a pod:
  etils.epath (our metrics, input-pipeline state, evaluator outputs; orbax's folders and metadata)
      epath's gs:// backend is swapped (epath.testing.mock_epath) for one that maps gs://B/K to ROOT/B/K;
  TensorStore (orbax's array data, OCDBT)
      its own GCS client, pointed at a local HTTP server that speaks the JSON API subset it uses
      (TENSORSTORE_GCS_HTTP_URL, the hook TensorStore's own tests use) with a fixed test token;
  google-cloud-storage (orbax asks it whether the bucket has a hierarchical namespace)
      STORAGE_EMULATOR_HOST, the same HTTP server;
  array_record's reader (training data, google-cloud-cpp's client)
      CLOUD_STORAGE_EMULATOR_ENDPOINT, the same HTTP server.
So orbax writes gs:// paths itself, with its GCS-only behaviour (commit files instead of renames, the GCS
TensorStore driver); nothing is patched inside orbax or sycoca_jax.

TensorFlow's GCS client (clu's TensorBoard writer) has no endpoint override, so it alone cannot be served:
the test points the TensorBoard writer at the mapped folder. On a real bucket TensorFlow handles gs:// itself.
"""

import http.server
import io
import json
import os
import re
import stat
import threading
import urllib.parse

import jax
import ml_collections
import numpy as np
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing
from PIL import Image

from sycoca_jax import checkpoint, data, evaluate, inference, metrics, paths, train
from sycoca_jax.data import pipeline, webdataset
from tests.helpers import small_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BUCKET = "sycoca-test-bucket"


class _FakeBucketServer(http.server.ThreadingHTTPServer):
  """Cloud Storage's JSON API (the calls TensorStore and google-cloud-storage make) over files in `root`.

  Objects are files ROOT/BUCKET/NAME, so what epath writes through the mapped backend and what TensorStore
  uploads land in one tree. Generations are counted here and follow a file's (inode, size, mtime), so files
  written around the server still get a new generation (TensorStore caches by generation).
  """

  daemon_threads = True

  def __init__(self, root: str):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.root = root
    self.lock = threading.Lock()
    self.generations: dict[str, tuple[tuple[int, int, int], int]] = {}
    self.counter = 0
    self.requests: list[str] = []

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}"

  def file(self, bucket: str, name: str) -> str:
    return os.path.join(self.root, bucket, *name.split("/"))

  def generation(self, bucket: str, name: str) -> int | None:
    """The object's generation; None when there is no such object."""
    try:
      st = os.stat(self.file(bucket, name))
    except (FileNotFoundError, NotADirectoryError):
      return None
    if not stat.S_ISREG(st.st_mode):
      return None
    key, fingerprint = f"{bucket}/{name}", (st.st_ino, st.st_size, st.st_mtime_ns)
    known = self.generations.get(key)
    if known is None or known[0] != fingerprint:
      self.counter += 1
      known = self.generations[key] = (fingerprint, self.counter)
    return known[1]

  def metadata(self, bucket: str, name: str) -> dict:
    return {"kind": "storage#object", "bucket": bucket, "name": name, "id": f"{bucket}/{name}",
            "generation": str(self.generation(bucket, name)), "metageneration": "1",
            "size": str(os.path.getsize(self.file(bucket, name))), "contentType": "application/octet-stream",
            "updated": "2024-01-01T00:00:00.000Z", "timeCreated": "2024-01-01T00:00:00.000Z"}

  def names(self, bucket: str) -> list[str]:
    top = os.path.join(self.root, bucket)
    out = []
    for directory, _, files in os.walk(top):
      rel = os.path.relpath(directory, top)
      out += [f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}" for f in files]
    return sorted(out)


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  server: _FakeBucketServer

  def log_message(self, *args):
    pass

  def _reply(self, status: int, body: bytes | dict = b"", headers: dict | None = None):
    if isinstance(body, dict):
      body = json.dumps(body).encode()
      headers = {"Content-Type": "application/json", **(headers or {})}
    self.send_response(status)
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      data = b""
      while True:
        size = int(self.rfile.readline().strip().split(b";")[0], 16)
        if not size:
          self.rfile.readline()
          return data
        data += self.rfile.read(size)
        self.rfile.readline()
    return self.rfile.read(int(self.headers.get("Content-Length", 0)))

  def _route(self):
    url = urllib.parse.urlsplit(self.path)
    query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
    match = re.fullmatch(r"(/upload|/download)?/storage/v1/b/([^/]+)(/o(?:/(.*))?)?", url.path)
    if not match:
      return None
    upload, bucket, objects, name = match.groups()
    return (upload, bucket, objects, urllib.parse.unquote(name) if name is not None else None, query)

  def _preconditions(self, query: dict, generation: int | None) -> int | None:
    """The status a read with a failed ifGeneration(Not)Match gets (0 matches a missing object), or None."""
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != (generation or 0):
      return 412
    if "ifGenerationNotMatch" in query and generation is not None and int(
        query["ifGenerationNotMatch"]) == generation:
      return 304
    return None

  def do_GET(self):  # pylint: disable=invalid-name
    route = self._route()
    s = self.server
    s.requests.append(f"GET {self.path}")
    if route is None:
      return self._reply(404)
    _, bucket, objects, name, query = route
    with s.lock:
      if objects is None:
        return self._reply(200, {"kind": "storage#bucket", "id": bucket, "name": bucket,
                                 "location": "US", "storageClass": "STANDARD"})
      if name is None:
        return self._reply(200, self._list(bucket, query))
      generation = s.generation(bucket, name)
      failed = self._preconditions(query, generation)
      if failed:
        return self._reply(failed)
      if generation is None:
        return self._reply(404, {"error": {"code": 404, "message": f"No such object: {bucket}/{name}"}})
      if query.get("alt") != "media":
        return self._reply(200, s.metadata(bucket, name))
      with open(s.file(bucket, name), "rb") as f:
        data = f.read()
    headers = {"x-goog-generation": str(generation), "x-goog-metageneration": "1",
               "Content-Type": "application/octet-stream"}
    byte_range = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
    if byte_range:
      first, last = byte_range.groups()
      start = int(first) if first else max(0, len(data) - int(last))
      stop = min(len(data), int(last) + 1) if first and last else len(data)
      if start >= len(data) and data:
        return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
      headers["Content-Range"] = f"bytes {start}-{max(start, stop - 1)}/{len(data)}"
      return self._reply(206, data[start:stop], headers)
    return self._reply(200, data, headers)

  def _list(self, bucket: str, query: dict) -> dict:
    names = [n for n in self.server.names(bucket) if n.startswith(query.get("prefix", ""))]
    if "startOffset" in query:
      names = [n for n in names if n >= query["startOffset"]]
    if query.get("endOffset"):
      names = [n for n in names if n < query["endOffset"]]
    if "pageToken" in query:
      names = [n for n in names if n > query["pageToken"]]
    prefixes = set()
    if query.get("delimiter"):
      cut, kept = len(query.get("prefix", "")), []
      for n in names:
        head, sep, _ = n[cut:].partition(query["delimiter"])
        (prefixes.add(n[:cut] + head + sep) if sep else kept.append(n))
      names = kept
    limit = int(query.get("maxResults", 1000))
    out = {"kind": "storage#objects", "items": [self.server.metadata(bucket, n) for n in names[:limit]]}
    if prefixes:
      out["prefixes"] = sorted(prefixes)
    if len(names) > limit:
      out["nextPageToken"] = names[limit - 1]
    return out

  def do_POST(self):  # pylint: disable=invalid-name
    route = self._route()
    s = self.server
    s.requests.append(f"POST {self.path}")
    body = self._body()
    if route is None or route[0] != "/upload" or route[1] is None or route[3] is not None:
      return self._reply(404)
    _, bucket, _, _, query = route
    if query.get("uploadType") != "media" or not query.get("name"):
      return self._reply(400, {"error": {"code": 400, "message": "Only uploadType=media is served."}})
    name = query["name"]
    with s.lock:
      if self._preconditions(query, s.generation(bucket, name)):
        return self._reply(412)  # a write whose precondition fails is refused, whichever it was
      path = s.file(bucket, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".upload", "wb") as f:
        f.write(body)
      os.replace(path + ".upload", path)
      st = os.stat(path)
      s.counter += 1
      s.generations[f"{bucket}/{name}"] = ((st.st_ino, st.st_size, st.st_mtime_ns), s.counter)
      return self._reply(200, s.metadata(bucket, name))

  def do_DELETE(self):  # pylint: disable=invalid-name
    route = self._route()
    s = self.server
    s.requests.append(f"DELETE {self.path}")
    if route is None or route[3] is None:
      return self._reply(404)
    _, bucket, _, name, query = route
    with s.lock:
      generation = s.generation(bucket, name)
      if generation is None:
        return self._reply(404)
      if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
        return self._reply(412)
      os.remove(s.file(bucket, name))
      s.generations.pop(f"{bucket}/{name}", None)
      return self._reply(204)


def _mapped_epath(root: str):
  """epath.testing.mock_epath with gs://B/K read and written as ROOT/B/K; other paths untouched."""

  def local(p):
    p = os.fspath(p)
    return os.path.join(root, p[len("gs://"):]) if p.startswith("gs://") else p

  def remote(p, like):
    p = os.fspath(p)
    return "gs://" + os.path.relpath(p, root) if os.fspath(like).startswith("gs://") else p

  def mapped(original, path, *args, **kwargs):
    return original(local(path), *[local(a) if isinstance(a, (str, os.PathLike)) else a for a in args], **kwargs)

  def glob(original, pattern):
    return [remote(p, pattern) for p in original(local(pattern))]

  def walk(original, top, **kwargs):
    for directory, dirs, files in original(local(top), **kwargs):
      yield remote(directory, top), dirs, files

  fns = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rename", "replace", "rmtree",
         "stat")
  return epath_testing.mock_epath(glob=glob, walk=walk, **{f: mapped for f in fns})


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """The root folder that gs://sycoca-test-bucket/... lands in; served to epath, TensorStore and GCS clients."""
  root = tmp_path / "buckets"
  (root / _BUCKET).mkdir(parents=True)
  server = _FakeBucketServer(str(root))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  monkeypatch.setenv("EPATH_USE_TF", "false")  # epath's gs:// goes to its backend table, which the mock replaces
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", server.url)
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", server.url)
  monkeypatch.chdir(tmp_path)
  # epath decides once per process whether gs:// goes through TensorFlow; an earlier test in the same process
  # may have decided it with EPATH_USE_TF unset, so the cached answer is dropped on the way in and out.
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  with _mapped_epath(str(root)):
    yield root, server
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  server.shutdown()
  server.server_close()


def _tree(root) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


@pytest.mark.slow(reason="trains, resumes and evaluates against a fake Cloud Storage server")
def test_train_resume_and_evaluate_in_a_bucket(fake_gcs, tmp_path, monkeypatch):
  root, server = fake_gcs
  run = f"gs://{_BUCKET}/run"
  local_run = root / _BUCKET / "run"
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow: not at collection)
  real_writer = metric_writers.create_default_writer

  def tensorboard_in_the_bucket_folder(logdir=None, **kwargs):  # TensorFlow's GCS client has no fake (above)
    if logdir and str(logdir).startswith("gs://"):
      logdir = str(root / str(logdir)[len("gs://"):])
    return real_writer(logdir, **kwargs)

  monkeypatch.setattr(metric_writers, "create_default_writer", tensorboard_in_the_bucket_folder)
  config = small_train_config(total_steps=2, ckpt_steps=2, keep_ckpts=1)
  captioning = config.evals.captioning
  captioning.update(max_examples=8, batch_size=8, tokenization="simple", predictions_path=f"{run}/captions.json")
  config.evals = ml_collections.ConfigDict({"captioning": captioning})

  train.train_and_evaluate(config, run)
  assert checkpoint.Checkpointer(run).latest_step() == 2
  config.total_steps = 4  # the same run, longer: resumes from step 2 with the pipeline state of step 2
  train.train_and_evaluate(config, run)
  results = evaluate.evaluate_checkpoint(config, run)

  # Every piece is in the bucket, and nothing became a local folder named after the URL.
  assert not any(p.name.startswith("gs:") for p in tmp_path.iterdir())
  assert not os.path.exists(os.path.join(ROOT, "gs:"))
  files = _tree(local_run)
  assert {"metrics.jsonl.parts/000000.jsonl", "captions.json", "data_state/4/process_0.json",
          "checkpoints/4/_CHECKPOINT_METADATA", "checkpoints/4/state/_METADATA"} <= files, sorted(files)
  assert not any(f.startswith(("checkpoints/2/", "data_state/2/")) for f in files)  # keep_ckpts=1 pruned them
  assert any(f.startswith("events.out.tfevents") for f in files)
  # orbax's arrays went through TensorStore's GCS driver, not a local file driver.
  assert any(r.startswith("POST /upload/storage/v1/b/" + _BUCKET) and "checkpoints%2F4%2Fstate" in r
             for r in server.requests)

  rows = metrics.read_jsonl(run)
  assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2, 3, 4]  # the resumed run went on at step 3
  assert rows[-1]["step"] == 4 and rows[-1]["captioning/num_images"] == results["captioning/num_images"] == 8
  assert len(json.loads((local_run / "captions.json").read_text())) == 8

  # Loading for inference, and a params-only checkpoint written to and read from the bucket (the converters').
  model = inference.load(run)
  _, params, step = checkpoint.load_params(run)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, model.params, params)
  checkpoint.save_params(f"{run}/imported", params, config)
  assert (local_run / "imported" / "checkpoints" / "0" / "commit_success.txt").exists()
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(f"{run}/imported")[1], params)


def test_training_data_in_a_bucket(fake_gcs):
  """data.path gs://...: the pattern is expanded through epath, the records read from the bucket over HTTP."""
  root, server = fake_gcs
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  folder = root / _BUCKET / "cc" / "train"
  folder.mkdir(parents=True)
  for shard in range(2):
    writer = array_record_module.ArrayRecordWriter(str(folder / f"{shard:05d}.array_record"), "group_size:1")
    for i in range(3):
      value = 40 * (3 * shard + i)
      buffer = io.BytesIO()
      Image.new("RGB", (24, 20), (value, 255 - value, 99)).save(buffer, "PNG")
      writer.write(webdataset.serialize_record(f"{shard}{i}", buffer.getvalue(), [f"picture {3 * shard + i}"]))
    writer.close()
  (folder / "notes.txt").write_text("not a shard")
  pattern = f"gs://{_BUCKET}/cc/*/*.array_record"
  assert paths.glob(pattern) == [f"gs://{_BUCKET}/cc/train/00000.array_record",
                                 f"gs://{_BUCKET}/cc/train/00001.array_record"]
  cfg = data.default_data_config()
  cfg.update(name="webdataset_array_record", path=pattern, image_size=16, tokenizer="clip_bpe", max_len=12,
             num_workers=0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
  # Reads wait on the network: two chunks at once, each with its 16 record reads in flight together.
  assert pipeline._thread_layout(cfg) == (2, 16)  # pylint: disable=protected-access
  batch = next(data.build_train_iterator(cfg, global_batch_size=6, seed=0, process_index=0, process_count=1))
  assert sorted(batch["example_id"].tolist()) == list(range(6))  # one epoch: every record of both shards
  for row, record in zip(batch["image"], batch["example_id"]):
    assert abs(int(row[..., 0].mean()) - 40 * int(record)) <= 1
  assert any(r.startswith(f"GET /storage/v1/b/{_BUCKET}/o/cc%2Ftrain%2F00001.array_record") for r in server.requests)


def test_paths_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.resolve("gs://bucket/run")) == "gs://bucket/run"
  assert str(paths.resolve("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
  assert str(paths.resolve("run")) == str(tmp_path / "run")
  assert paths.is_url("s3://b/k") and not paths.is_url("/tmp/gs:/b") and not paths.is_url("run")
  paths.write_atomic(tmp_path / "a.json", "{}")
  assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_metrics_on_an_object_store_are_new_parts_never_a_rewritten_file(tmp_path):
  """Object stores have no append: rows go up as new objects, and read_jsonl still gives each step once."""
  writer = metrics.JsonlWriter(tmp_path / "metrics.jsonl", object_store=True, flush_s=3600)
  parts = tmp_path / "metrics.jsonl.parts"
  writer.write_hparams({"lr": 1.0})
  for step in range(1, 5):
    writer.write_scalars(step, {"loss": float(step)})
    if step % 2 == 0:
      writer.flush()  # as the trainer does before each checkpoint
  writer.write_scalars(5, {"loss": 5.0})  # then killed: step 5 is never flushed
  assert sorted(os.listdir(parts)) == ["000000.jsonl", "000001.jsonl"] and not (tmp_path / "metrics.jsonl").exists()
  written = {f: os.stat(parts / f).st_mtime_ns for f in os.listdir(parts)}
  # The resumed run (from step 3) drops the rows past it, and goes on in new parts.
  writer = metrics.JsonlWriter(tmp_path / "metrics.jsonl", resume_step=3, object_store=True)
  assert os.stat(parts / "000000.jsonl").st_mtime_ns == written["000000.jsonl"]  # untouched
  for step in range(4, 7):
    writer.write_scalars(step, {"loss": 10.0 * step})
  writer.close()
  rows = metrics.read_jsonl(tmp_path)
  assert [r.get("step") for r in rows] == [None, 1, 2, 3, 4, 5, 6] and rows[4]["loss"] == 40.0
  assert sorted(os.listdir(parts)) == ["000000.jsonl", "000001.jsonl", "000002.jsonl"]
