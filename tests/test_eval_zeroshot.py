"""Zero-shot classification: prompt ensembles and top-k on analytic embeddings, the offline sets, end to end."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sycoca_jax import data
from sycoca_jax import evaluators
from sycoca_jax import inference
from sycoca_jax.evaluators import datasets
from sycoca_jax.evaluators import zeroshot
from tests import helpers


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_perfect_embedding_gives_top1_one():
  rng = np.random.default_rng(0)
  c, t, e, n = 10, 3, 64, 500
  directions = _unit(rng.normal(size=(c, e)))
  # Each template's text embedding is the class direction plus template noise, at arbitrary scale.
  prompts = (directions[:, None] + 0.2 * rng.normal(size=(c, t, e))) * rng.uniform(0.5, 3, size=(c, t, 1))
  labels = rng.integers(0, c, n)
  images = _unit(directions[labels] + 0.1 * rng.normal(size=(n, e)))
  weights = zeroshot.class_embeddings(prompts)
  np.testing.assert_allclose(np.linalg.norm(weights, axis=-1), 1.0, rtol=1e-5)
  m = zeroshot.topk_accuracy(images @ weights.T, labels, ks=(1, 5))
  assert m == {"top1": 1.0, "top5": 1.0}


def test_random_embedding_is_at_chance():
  rng = np.random.default_rng(1)
  c, n = 10, 6000
  weights = zeroshot.class_embeddings(rng.normal(size=(c, 4, 32)))
  images = _unit(rng.normal(size=(n, 32)))
  m = zeroshot.topk_accuracy(images @ weights.T, rng.integers(0, c, n), ks=(1, 5))
  assert m["top1"] == pytest.approx(1 / c, abs=0.02)
  assert m["top5"] == pytest.approx(5 / c, abs=0.03)


def test_ensemble_averages_normalised_prompts_and_ties_count_against():
  # Templates at very different scales weigh equally: the mean is taken after normalising each.
  prompts = np.array([[[10.0, 0.0], [0.0, 0.1]]])
  np.testing.assert_allclose(zeroshot.class_embeddings(prompts), [[2 ** -0.5, 2 ** -0.5]], rtol=1e-6)
  assert zeroshot.topk_accuracy(np.zeros((4, 3)), np.array([0, 1, 2, 0]), ks=(1, 3)) == {"top1": 0.0, "top3": 1.0}


def test_offline_sets_load():
  digits = datasets.load("sklearn_digits", helpers.eval_data_config())
  assert len(digits) == 1797 and digits.num_classes == 10
  batch = next(digits.batches(8))
  assert batch["image"].shape == (8, 32, 32, 3)
  # Dark ink on white: a digit image is mostly background, uint8 pixels near white (normalised on the device).
  assert batch["image"].dtype == np.uint8 and np.median(np.asarray(batch["image"])) > 200
  faces = datasets.load("lfw_subset", helpers.eval_data_config(), max_examples=20)
  assert len(faces) == 20 and sorted(np.bincount(faces.labels)) == [10, 10]
  with pytest.raises(ValueError, match="Unknown image set"):
    datasets.load("imagenet", helpers.eval_data_config())


def test_offline_sets_are_the_data_layers_splits():
  # One definition of each set: the image sets and the data layer's eval splits give the same pixels and labels.
  cfg = helpers.eval_data_config()
  for name in ("sklearn_digits", "lfw_subset"):
    image_set, split = datasets.load(name, cfg), data.load_eval_split(cfg, name)
    np.testing.assert_array_equal(image_set.labels, split.labels)
    assert image_set.class_names == split.class_names and image_set.templates == split.templates
    np.testing.assert_array_equal(image_set.images(np.array([0, 150])), [split.image(0), split.image(150)])


def test_zeroshot_evaluator_end_to_end():
  model, _, params = helpers.eval_model()
  eval_config = ml_collections.ConfigDict(dict(
      type="zeroshot", datasets=("scenes_shape", "scenes_colour", "scenes_digit", "sklearn_digits"),
      max_examples=16, batch_size=8))
  evaluator = evaluators.build(model, eval_config, helpers.eval_data_config())
  metrics = evaluator.run(params)
  names = ("scenes_shape", "scenes_colour", "scenes_digit", "sklearn_digits")
  assert set(metrics) == {f"zeroshot/{n}_top{k}" for n in names for k in (1, 5)} | {"zeroshot/mean_top1"}
  assert all(np.isfinite(v) and 0 <= v <= 1 for v in metrics.values()), metrics
  # Weights laid out on a trainer-style 2-D mesh in another device order: the eval batches follow that mesh
  # (jit refuses arguments with different device assignments) and the answer does not change.
  mesh = Mesh(np.asarray(jax.devices()[::-1]).reshape(4, 2), ("data", "fsdp"))
  on_mesh = jax.device_put(params, NamedSharding(mesh, P()))
  assert evaluator.run(on_mesh) == pytest.approx(metrics)


def test_captioner_classifies_by_the_likelihood_of_each_prompt():
  """captioner=True: each image against every prompt by log p(prompt | image), the numbers the inference API
  scores an image-text pair with; the class is the one whose prompts score highest on average. The contrastive
  metrics stay as they are."""
  model, model_config, params = helpers.eval_model()
  metrics = {}
  for captioner in (False, True):
    eval_config = ml_collections.ConfigDict(dict(type="zeroshot", datasets=("scenes_shape",), max_examples=16,
                                                 batch_size=8, captioner=captioner))
    evaluator = evaluators.build(model, eval_config, helpers.eval_data_config())
    metrics[captioner] = evaluator.run(params)
  assert set(metrics[True]) == set(metrics[False]) | {f"zeroshot/scenes_shape_captioner_top{k}" for k in (1, 5)} | {
      "zeroshot/captioner_mean_top1"}
  assert {k: metrics[True][k] for k in metrics[False]} == metrics[False]

  image_set, (_, num_classes, num_templates) = evaluator.sets[0], evaluator.prompts[0]
  images, labels = np.asarray(next(image_set.batches(16))["image"]), image_set.labels[:16]
  texts = [t.format(c) for c in image_set.class_names for t in image_set.templates]
  tokenizer = data.get_tokenizer("scenes_words", max_len=helpers.EVAL_MAX_LEN)
  reference = inference.Inference(model_config, params, tokenizer)
  want = np.stack([reference.score(image[None], texts, preprocessed=True)["log_likelihood"] for image in images])
  got = evaluator._scored_fns[0](params, images)["loglik"]  # pylint: disable=protected-access  (its own program)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  by_class = want.reshape(16, num_classes, num_templates).mean(-1)
  assert metrics[True]["zeroshot/scenes_shape_captioner_top1"] == pytest.approx(
      zeroshot.topk_accuracy(by_class, labels, ks=(1,))["top1"])
