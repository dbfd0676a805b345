"""The metric writers: TensorBoard reads what a local run writes, and writing it never loads TensorFlow."""

import glob
import io
import os
import subprocess
import sys
import types

import numpy as np
import PIL.Image

from sycoca_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tensorboard_reads_scalars_images_texts_and_hparams(tmp_path, monkeypatch):
  # TensorBoard's own reader, as it runs where TensorFlow is not installed (the `notf` switch TensorBoard
  # provides): it too checks every record's length and checksums, without the seconds of importing TensorFlow.
  monkeypatch.setitem(sys.modules, "tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  writer = metrics.create_writer(tmp_path, resume_step=0)
  images = np.random.default_rng(0).uniform(size=(3, 8, 6, 3)).astype(np.float32)
  writer.write_hparams({"lr": 1e-3, "variant": "sycoca", "heads": ("itc", "ic")})
  writer.write_scalars(1, {"loss": 2.5, "accuracy": np.float32(0.25)})
  writer.write_scalars(2, {"loss": np.asarray(2.0)})
  writer.write_images(2, {"input": images, "one": (images[0] * 255).astype(np.uint8)})
  writer.write_texts(2, {"caption": "a red circle"})
  writer.close()

  files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert len(files) == 1
  acc = event_accumulator.EventAccumulator(files[0], size_guidance={"images": 0, "tensors": 0})
  acc.Reload()  # TensorBoard's reader checks every record's length and data checksums
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
  assert [(e.step, e.value) for e in acc.Scalars("accuracy")] == [(1, 0.25)]

  (strip,) = acc.Images("input")
  decoded = np.asarray(PIL.Image.open(io.BytesIO(strip.encoded_image_string)))
  expected = np.round(np.concatenate(list(images), axis=1) * 255).astype(np.uint8)
  assert (strip.step, decoded.shape) == (2, (8, 18, 3))
  np.testing.assert_array_equal(decoded, expected)
  (one,) = acc.Images("one")
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(one.encoded_image_string))),
                                (images[0] * 255).astype(np.uint8))

  (text,) = acc.Tensors("caption")
  assert (text.step, text.tensor_proto.string_val) == (2, [b"a red circle"])
  assert acc.summary_metadata["caption"].plugin_data.plugin_name == "text"

  hparams = acc.summary_metadata["_hparams_/session_start_info"]
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  start = plugin_data_pb2.HParamsPluginData.FromString(hparams.plugin_data.content).session_start_info
  assert start.hparams["lr"].number_value == 1e-3
  assert start.hparams["variant"].string_value == "sycoca"
  assert start.hparams["heads"].string_value == "('itc', 'ic')"

  assert metrics.read_jsonl(tmp_path)[1:] == [{"step": 1, "loss": 2.5, "accuracy": 0.25}, {"step": 2, "loss": 2.0},
                                              {"step": 2, "caption": "a red circle"}]


def test_training_writers_do_not_import_tensorflow(tmp_path):
  """TensorFlow costs seconds of import in every training process; the local writers must not load it."""
  code = ("import sys, numpy as np; from sycoca_jax import metrics, train; "
          f"w = metrics.create_writer({str(tmp_path)!r}, 0); w.write_hparams({{'a': 1}}); "
          "w.write_scalars(1, {'x': 1.0}); w.write_images(1, {'i': np.zeros((1, 4, 4, 3))}); "
          "w.write_texts(1, {'t': 's'}); w.close(); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
