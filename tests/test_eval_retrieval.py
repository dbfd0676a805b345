"""Retrieval metrics on analytic embeddings whose recalls are known, and the evaluator end to end."""

import jax
import ml_collections
import numpy as np
import pytest

from sycoca_jax import evaluators
from sycoca_jax.evaluators import retrieval
from tests import helpers


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_identical_embeddings_give_perfect_recall():
  emb = _unit(np.random.default_rng(0).normal(size=(50, 32)))
  m = retrieval.recall_metrics(emb, emb, np.arange(50))
  assert all(v == 1.0 for k, v in m.items() if k != "rsum"), m
  assert m["rsum"] == 6.0


def test_reversed_pairing_gives_known_recall():
  # Orthogonal embeddings, caption j paired with image N-1-j: only the middle pair is right. Every wrong
  # candidate ties with the right one at similarity 0 and ties count against the model, so rank = N - 1.
  n = 5
  emb = np.eye(n)
  m = retrieval.recall_metrics(emb, emb, np.arange(n)[::-1].copy(), ks=(1, 4, 5))
  assert m["i2t_r1"] == m["t2i_r1"] == pytest.approx(1 / n)
  assert m["i2t_r4"] == pytest.approx(1 / n)
  assert m["i2t_r5"] == m["t2i_r5"] == 1.0


@pytest.mark.parametrize("shift", [0, 1, 3, 7])
def test_shifted_pairing_rank_equals_shift(shift):
  # sim[i, j] = -((i - j) mod N): caption j's closest images are j, j+1, ...; pairing caption j with image
  # j + shift puts the right answer at rank `shift` in both directions.
  n = 12
  i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  sim = -((i - j) % n).astype(np.float32)
  images, texts = np.eye(n), sim.T  # images @ texts.T == sim
  i2t, t2i = retrieval.retrieval_ranks(images, texts, (np.arange(n) + shift) % n)
  np.testing.assert_array_equal(i2t, shift)
  np.testing.assert_array_equal(t2i, shift)
  m = retrieval.recall_metrics(images, texts, (np.arange(n) + shift) % n)
  assert m["i2t_r1"] == float(shift < 1) and m["i2t_r5"] == float(shift < 5) and m["t2i_r10"] == float(shift < 10)
  assert m["mTR"] == pytest.approx(np.mean([shift < k for k in (1, 5, 10)]))


def test_several_captions_per_image():
  # Image i has two captions: 2i matches it exactly, 2i+1 is orthogonal to every image. An image is found by
  # its good caption (i2t R@1 = 1); its bad captions find nothing (t2i R@1 = 0.5).
  n = 6
  images = np.eye(2 * n)[:n]
  texts = np.zeros((2 * n, 2 * n))
  texts[0::2, :n] = np.eye(n)
  texts[1::2, n:] = np.eye(n)
  owner = np.repeat(np.arange(n), 2)
  m = retrieval.recall_metrics(images, texts, owner)
  assert m["i2t_r1"] == 1.0
  assert m["t2i_r1"] == 0.5
  # With only the bad caption first and the good one last, the image is still found: any caption counts.
  order = np.r_[np.arange(1, 2 * n, 2), np.arange(0, 2 * n, 2)]
  i2t, _ = retrieval.retrieval_ranks(images, texts[order], owner[order])
  np.testing.assert_array_equal(i2t, 0)


def test_degenerate_model_is_not_rewarded_and_chunks_agree():
  same = np.ones((20, 8))
  m = retrieval.recall_metrics(same, same, np.arange(20))
  assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
  rng = np.random.default_rng(1)
  images, texts = rng.normal(size=(30, 8)), rng.normal(size=(90, 8))
  owner = rng.integers(0, 30, 90)
  full = retrieval.retrieval_ranks(images, texts, owner, chunk=1000)
  chunked = retrieval.retrieval_ranks(images, texts, owner, chunk=7)
  for a, b in zip(full, chunked):
    np.testing.assert_array_equal(a, b)
  # An image without captions is a miss, never a hit.
  i2t, _ = retrieval.retrieval_ranks(np.eye(3), np.eye(3)[:2], np.array([0, 1]))
  assert i2t[2] == retrieval.MISS
  assert retrieval.recall_metrics(np.eye(3), np.eye(3)[:2], np.array([0, 1]))["i2t_r10"] == pytest.approx(2 / 3)


def test_pairwise_accuracy():
  assert retrieval.pairwise_accuracy([2, 1, 0, 5], [1, 1, 3, 0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
  assert retrieval.pairwise_accuracy([1, 0], [0, 1], valid=[True, False]) == 1.0
  assert np.isnan(retrieval.pairwise_accuracy([1], [0], valid=[False]))


def test_fine_grained_pairs_differ_and_are_valid():
  from sycoca_jax.data import get_tokenizer
  from sycoca_jax.data.scenes import ScenesSource
  source = ScenesSource("test", image_size=32, num_examples=30)
  texts, valid = retrieval.fine_grained_pairs(source, get_tokenizer("scenes_words", max_len=24))
  assert texts.shape == (30, 4, 2, 24) and valid.shape == (30, 4)
  assert valid[:, 0].mean() > 0.8  # attributes: almost every scene supports one
  for i, k in zip(*np.nonzero(valid)):
    assert not np.array_equal(texts[i, k, 0], texts[i, k, 1])


def test_retrieval_evaluator_end_to_end():
  model, _, params = helpers.eval_model()
  eval_config = ml_collections.ConfigDict(dict(type="retrieval", max_examples=12, batch_size=8))
  evaluator = evaluators.build(model, eval_config, helpers.eval_data_config())
  metrics = evaluator.run(params)
  expected = {f"retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {
      "retrieval/mTR", "retrieval/mIR", "retrieval/rsum", "retrieval/num_images"} | {
      f"retrieval/fg_{kind}_{s}" for kind in ("attribute", "object", "relation", "count", "mean")
      for s in ("itc", "loglik")}
  assert set(metrics) == expected
  assert metrics["retrieval/num_images"] == 12
  for key, value in metrics.items():
    assert np.isfinite(value), key
    if key != "retrieval/rsum" and key != "retrieval/num_images":
      assert 0.0 <= value <= 1.0, key
  assert evaluator.run(params) == metrics  # cached images, same compiled programs, same answer


def test_per_device_batch_size_makes_the_global_batch():
  model, _, _ = helpers.eval_model()
  cfg = retrieval.default_config()
  cfg.update(max_examples=16, per_device_batch_size=3)
  [(_, evaluator, _)] = evaluators.from_config({"retrieval": cfg}, model, helpers.eval_data_config())
  assert evaluator.batch_size == 3 * jax.device_count()
