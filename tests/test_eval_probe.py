"""Linear probes on separable features, and the probe evaluator end to end (ridge, logistic, fine-tuning)."""

import ml_collections
import numpy as np
import pytest

from sycoca_jax import evaluators
from sycoca_jax.evaluators import datasets
from sycoca_jax.evaluators import probe
from tests import helpers


def _clusters(n, c, f, seed, spread=0.3):
  rng = np.random.default_rng(seed)
  centres = 3.0 * rng.normal(size=(c, f))
  labels = rng.integers(0, c, n)
  return centres[labels] + spread * rng.normal(size=(n, f)), labels


def test_ridge_recovers_a_separable_labelling():
  x, y = _clusters(400, 5, 16, seed=0)
  l2 = probe.select_ridge(x[:300], y[:300], 5, (1e-4, 1e-2, 1.0))
  w, b = probe.ridge_fit(x[:300], y[:300], 5, l2)
  assert np.mean(probe.ridge_predict(x[300:], w, b).argmax(-1) == y[300:]) == 1.0


def test_ridge_fails_on_a_random_labelling():
  # The check above can fail: labels unrelated to the features give chance accuracy on held-out data.
  x, _ = _clusters(400, 5, 16, seed=0)
  y = np.random.default_rng(5).integers(0, 5, 400)
  w, b = probe.ridge_fit(x[:300], y[:300], 5, 1e-3)
  assert np.mean(probe.ridge_predict(x[300:], w, b).argmax(-1) == y[300:]) < 0.4


def test_ridge_primal_and_dual_agree_and_bias_is_not_shrunk():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(20, 50)), rng.integers(0, 3, 20)  # F > N: the dual form
  w, b = probe.ridge_fit(x, y, 3, 0.1)
  xc, yc = x - x.mean(0), np.eye(3)[y] - np.eye(3)[y].mean(0)
  w_primal = np.linalg.solve(xc.T @ xc + 0.1 * 20 * np.eye(50), xc.T @ yc)
  np.testing.assert_allclose(w, w_primal, atol=1e-8)
  # Huge L2: weights vanish and the prediction is the class frequencies (the bias), not zero.
  w, b = probe.ridge_fit(x, y, 3, 1e9)
  np.testing.assert_allclose(probe.ridge_predict(x[:1], w, b)[0], np.bincount(y, minlength=3) / 20, atol=1e-6)


def test_logistic_probe_separates_clusters():
  x, y = _clusters(200, 3, 8, seed=3)
  predicted = probe.logistic_probe(x[:150], y[:150], x[150:], c_grid=(0.1, 1.0))
  assert np.mean(predicted == y[150:]) == 1.0


def test_stratified_split_keeps_class_proportions():
  labels = np.repeat(np.arange(4), [10, 20, 30, 40])
  train, test = datasets.stratified_split(labels, 0.5, seed=0)
  assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 100
  np.testing.assert_array_equal(np.bincount(labels[test]), [5, 10, 15, 20])


def test_probe_evaluator_end_to_end():
  model, _, params = helpers.eval_model()
  eval_config = ml_collections.ConfigDict(dict(
      type="probe", datasets=("sklearn_digits", "lfw_subset", "scenes_count"), methods=("ridge", "logistic"),
      max_examples=24, batch_size=8))
  metrics = evaluators.build(model, eval_config, helpers.eval_data_config()).run(params)
  names = ("sklearn_digits", "lfw_subset", "scenes_count")
  assert set(metrics) == {f"probe/{n}_{m}_acc" for n in names for m in ("ridge", "logistic")}
  assert all(np.isfinite(v) and 0 <= v <= 1 for v in metrics.values()), metrics


def test_finetuning_changes_only_a_copy_and_learns():
  model, _, params = helpers.eval_model()
  eval_config = ml_collections.ConfigDict(dict(
      type="probe", datasets=("lfw_subset",), methods=("finetune",), max_examples=32, batch_size=8,
      test_fraction=0.25, finetune=dict(steps=40, batch_size=8, learning_rate=1e-2, warmup_steps=0)))
  evaluator = evaluators.build(model, eval_config, helpers.eval_data_config())
  before = np.asarray(params["image_encoder"]["proj"]).copy()
  metrics = evaluator.run(params)
  assert set(metrics) == {"probe/lfw_subset_finetune_acc"} and 0 <= metrics["probe/lfw_subset_finetune_acc"] <= 1
  np.testing.assert_array_equal(params["image_encoder"]["proj"], before)
  # Faces vs non-faces is easy: the fine-tuned model fits its training set.
  _, train, _ = evaluator.sets[0]
  tuned, head = evaluator.finetune_copy(params, train)
  assert not np.allclose(tuned["image_encoder"]["proj"], before)
  feats, labels = evaluator.features(tuned, train)
  assert np.mean((feats @ np.asarray(head["kernel"]) + np.asarray(head["bias"])).argmax(-1) == labels) >= 0.9


def test_unknown_method_is_refused():
  model, _, _ = helpers.eval_model()
  with pytest.raises(ValueError, match="unknown"):
    evaluators.build(model, ml_collections.ConfigDict(dict(type="probe", methods=("svm",))),
                     helpers.eval_data_config())
