"""VQA: pooling, soft targets and accuracy by hand, the data loaders (easy-VQA offline, a VQAv2 fixture), a head
that learns a trivially learnable mapping, and the evaluator end to end."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from sycoca_jax import evaluators
from sycoca_jax.data import get_tokenizer
from sycoca_jax.data.scenes import VQA_ANSWERS
from sycoca_jax.evaluators import vqa
from tests import helpers


def test_pooling_over_real_tokens():
  features = jnp.arange(2 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 1)  # [[0,1,2,3], [4,5,6,7]]
  question = jnp.array([[1, 9, 2, 0], [1, 9, 9, 2]])
  np.testing.assert_allclose(vqa.pool_features(features, question, "mean")[:, 0], [1.0, 5.5])
  np.testing.assert_allclose(vqa.pool_features(features, question, "last")[:, 0], [2.0, 7.0])


def test_soft_targets_accuracy_and_loss():
  data = vqa.VqaData("toy", ["q0", "q1", "q2"], np.zeros(3, np.int32),
                     answer_ids=np.array([[0, 2], [1, -1], [-1, -1]], np.int32),
                     answer_scores=np.array([[1.0, 1 / 3], [1.0, 0.0], [0.0, 0.0]], np.float32))
  targets = data.targets(np.arange(3), 4)
  np.testing.assert_allclose(targets, [[1, 0, 1 / 3, 0], [0, 1, 0, 0], [0, 0, 0, 0]], rtol=1e-6)
  assert vqa.vqa_accuracy(np.array([2, 1, 0]), data) == pytest.approx((1 / 3 + 1 + 0) / 3)
  # The loss ignores masked rows and rows without any target.
  logits = jnp.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [9.0, -9, 0, 0]])
  full = vqa.soft_cross_entropy(logits, jnp.asarray(targets), jnp.ones(3))
  first_two = vqa.soft_cross_entropy(logits[:2], jnp.asarray(targets[:2]), jnp.ones(2))
  assert float(full) == pytest.approx(float(first_two))
  only_first = vqa.soft_cross_entropy(logits, jnp.asarray(targets), jnp.array([1.0, 0, 0]))
  assert float(only_first) == pytest.approx(float(vqa.soft_cross_entropy(logits[:1], jnp.asarray(targets[:1]),
                                                                         jnp.ones(1))))
  assert float(only_first) != pytest.approx(float(full))


def test_easy_vqa_loads_offline():
  test, answers = vqa.load_easy_vqa("test")
  assert len(answers) == 13 and len(test) > 1000
  assert test.raw_images.dtype == np.uint8 and test.raw_images.shape[1:] == (64, 64, 3)
  assert (test.answer_ids >= 0).all() and test.image_index.max() < len(test.raw_images)


def _vqav2_fixture(tmp_path):
  image_dir = tmp_path / "val2014"
  image_dir.mkdir()
  for image_id, colour in ((1, (255, 0, 0)), (2, (0, 0, 255))):
    Image.new("RGB", (40, 30), colour).save(image_dir / f"COCO_val2014_{image_id:012d}.jpg")
  questions = {"data_subtype": "val2014", "questions": [
      {"question_id": 10, "image_id": 1, "question": "What color is it?"},
      {"question_id": 11, "image_id": 2, "question": "What color is it?"},
      {"question_id": 12, "image_id": 2, "question": "Is it red?"}]}
  ten = lambda *pairs: [{"answer": a} for a, k in pairs for _ in range(k)]  # noqa: E731
  annotations = {"annotations": [
      {"question_id": 10, "multiple_choice_answer": "red", "answers": ten(("red", 9), ("Red.", 1))},
      {"question_id": 11, "multiple_choice_answer": "blue", "answers": ten(("blue", 8), ("navy", 2))},
      {"question_id": 12, "multiple_choice_answer": "no", "answers": ten(("no", 10))}]}
  (tmp_path / "q.json").write_text(json.dumps(questions))
  (tmp_path / "a.json").write_text(json.dumps(annotations))
  return str(tmp_path / "q.json"), str(tmp_path / "a.json"), str(image_dir)


def test_vqav2_json_loader(tmp_path):
  q, a, image_dir = _vqav2_fixture(tmp_path)
  data, vocabulary = vqa.load_vqav2(q, a, image_dir, "COCO_{data_subtype}_{image_id:012d}.jpg")
  assert sorted(vocabulary) == ["blue", "no", "red"]  # most frequent multiple-choice answers
  assert data.questions[0] == "What color is it?" and list(data.image_index) == [0, 1, 1]
  targets = data.targets(np.arange(3), len(vocabulary))
  assert targets[0, vocabulary.index("red")] == 1.0  # 9 + 1 votes after normalisation ("Red." -> "red")
  assert targets[1, vocabulary.index("blue")] == 1.0 and targets[1].sum() == 1.0  # "navy" is not in vocabulary
  images = data.images(np.array([0, 1]), 32)
  assert images.shape == (2, 32, 32, 3) and images[0, ..., 0].mean() > images[1, ..., 0].mean()
  with pytest.raises(FileNotFoundError, match="VQAv2"):
    vqa.load_vqav2(str(tmp_path / "missing.json"), a, image_dir, "{image_id}.jpg")


def _toy_questions():
  """The answer is a function of the question alone; the images are noise."""
  questions = ["how many circles are there ?", "what color is the star ?", "is there a red square ?",
               "what is in the center ?"]
  rng = np.random.default_rng(0)
  return vqa.VqaData("toy", questions * 4, np.arange(16, dtype=np.int32),
                     answer_ids=np.tile(np.arange(4, dtype=np.int32), 4)[:, None],
                     answer_scores=np.ones((16, 1), np.float32),
                     raw_images=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))


def test_vqa_evaluator_end_to_end_and_learns_a_learnable_mapping(tmp_path):
  model, _, params = helpers.eval_model()
  q, a, image_dir = _vqav2_fixture(tmp_path)
  eval_config = ml_collections.ConfigDict(dict(
      type="vqa", datasets=("scenes", "easy_vqa", "vqav2"), num_train=6, max_train_questions=24,
      max_test_questions=8, batch_size=8, steps=2, train="decoder", learning_rate=1e-3, head_lr_mult=30.0,
      warmup_steps=0, vqav2=dict(train_questions=q, train_annotations=a, train_image_dir=image_dir,
                                 test_questions=q, test_annotations=a, test_image_dir=image_dir)))
  evaluator = evaluators.build(model, eval_config, helpers.eval_data_config())
  metrics = evaluator.run(params)
  assert set(metrics) == {"vqa/scenes_acc", "vqa/easy_vqa_acc", "vqa/vqav2_acc"}
  assert all(np.isfinite(v) and 0 <= v <= 1 for v in metrics.values()), metrics

  # The same fine-tuning (same compiled step and head width, 4 answers used) must fit a mapping that is a
  # function of the question: the decoder's pooled question features differ per question.
  data = _toy_questions()
  ids = get_tokenizer("scenes_words", max_len=helpers.EVAL_MAX_LEN).encode(data.questions)
  classifier = evaluator.classifier
  _, untrained = classifier.finetune(params, data, ids, 4, steps=0)
  assert vqa.vqa_accuracy(classifier.predict(params, untrained, data, ids, 4), data) <= 0.25  # zero head
  before = np.asarray(params["text_decoder"]["ln_final"]["scale"]).copy()
  tuned, head = classifier.finetune(params, data, ids, 4, steps=25)
  assert vqa.vqa_accuracy(classifier.predict(tuned, head, data, ids, 4), data) == 1.0
  # The head has the widest set's columns (scenes); the unused ones were never predicted (accuracy 1 above).
  assert head["kernel"].shape[-1] == len(VQA_ANSWERS) > 4
  np.testing.assert_array_equal(params["text_decoder"]["ln_final"]["scale"], before)  # weights were copied
