"""Mask quality: metrics on hand-made scores with a known answer, the scenes' named-object areas, end to end."""

import jax
import ml_collections
import numpy as np
import pytest

from sycoca_jax import evaluators
from sycoca_jax.data import scenes as scenes_lib
from sycoca_jax.evaluators import captioning
from sycoca_jax.evaluators import masking
from sycoca_jax.models import masking as masking_lib
from tests import helpers


def _object_coverage(rng, pairs, num_patches, max_objects=12):
  """Coverage [M, P]: a few patches per pair fully or partly covered, far fewer than half of them."""
  coverage = np.zeros((pairs, num_patches), np.float32)
  for m in range(pairs):
    ids = rng.choice(num_patches, size=rng.integers(1, max_objects + 1), replace=False)
    coverage[m, ids] = rng.uniform(0.1, 1.0, size=len(ids))
  return coverage


def test_scores_equal_to_the_object_mask_keep_every_object_patch():
  rng = np.random.default_rng(0)
  coverage = _object_coverage(rng, pairs=300, num_patches=64)
  # The model's own cut (masks_from_scores), fed with scores that are the object mask itself.
  masks = masking_lib.masks_from_scores(coverage, ic_ratio=0.5, mim_ratio=0.5)
  m = masking.mask_quality(np.asarray(masks.ic_keep), coverage, mim_mask=np.asarray(masks.mim_mask))
  assert m["ic_object_recall"] == 1.0
  assert m["mim_object_hidden"] == 1.0  # at 50 / 50 TG-MIM hides exactly the IC set
  assert m["ic_keep_fraction"] == 0.5
  np.testing.assert_allclose(m["ic_object_precision"], np.mean(coverage.sum(-1) / 32), rtol=1e-6)
  np.testing.assert_allclose(m["object_fraction"], coverage.mean(), rtol=1e-6)
  # Scores that rank the objects last keep none of them.
  masks = masking_lib.masks_from_scores(-coverage, ic_ratio=0.5, mim_ratio=0.5)
  assert masking.mask_quality(np.asarray(masks.ic_keep), coverage)["ic_object_recall"] == 0.0


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_random_masking_keeps_the_ratio_of_the_objects(ratio):
  rng = np.random.default_rng(1)
  coverage = _object_coverage(rng, pairs=4000, num_patches=64)
  strategy = masking_lib.get_strategy("random")
  masks = strategy(jax.random.PRNGKey(0), patch_embeddings=np.zeros((4000, 64, 1)), token_embeddings=None,
                   token_valid=None, ic_ratio=ratio, mim_ratio=ratio)
  m = masking.mask_quality(np.asarray(masks.ic_keep), coverage, mim_mask=np.asarray(masks.mim_mask))
  assert m["ic_keep_fraction"] == 1 - ratio
  assert m["ic_object_recall"] == pytest.approx(1 - ratio, abs=0.02)
  assert m["mim_object_hidden"] == pytest.approx(ratio, abs=0.02)
  assert m["ic_object_precision"] == pytest.approx(m["object_fraction"], rel=0.05)


def test_pairs_without_named_objects_and_invalid_pairs_are_left_out():
  coverage = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
  keep = np.array([[0, 1], [0, 1], [0, 1]])
  m = masking.mask_quality(keep, coverage)
  assert m["num_pairs"] == 2 and m["ic_object_recall"] == 0.5
  m = masking.mask_quality(keep, coverage, valid=np.array([True, True, False]))
  assert m["num_pairs"] == 1 and m["ic_object_recall"] == 1.0


def test_mentioned_objects_follow_the_caption():
  graph = {"objects": [{"shape": "circle", "colour": "red"}, {"shape": "7", "colour": "blue"},
                       {"shape": "circle", "colour": "green"}]}
  assert captioning.mentioned_objects("a red circle left of a blue 7", graph) == [0, 1]
  assert captioning.mentioned_objects("two circles", graph) == [0, 2]
  assert captioning.mentioned_objects("four things", graph) == []


def _evaluator(model, **overrides):
  cfg = ml_collections.ConfigDict(dict(type="masking", max_examples=24, batch_size=16) | overrides)
  return evaluators.build(model, cfg, helpers.eval_data_config())


def test_named_object_areas_come_from_the_scene():
  model, _, _ = helpers.eval_model()
  ev = _evaluator(model)
  size, patch = ev.data_config.image_size, model.image_encoder.patch_size
  source = scenes_lib.ScenesSource("test", image_size=size, patch_size=patch)
  for i in range(5):
    objects = source[i]["object_patches"].reshape(-1, (size // patch) ** 2)
    np.testing.assert_allclose(ev.scene_coverage[i], np.clip(objects.sum(0), 0, 1), atol=1e-6)
    assert np.all(ev.coverage[i] <= ev.scene_coverage[i][None] + 1e-6)
  assert ev.texts.shape[:2] == ev.coverage.shape[:2] == (24, 5)
  assert ev.pair_valid.mean() > 0.8  # most captions name an object


def test_ratios_default_to_the_model_then_to_half():
  model, _, _ = helpers.eval_model()
  cfg = masking.default_config()
  assert masking.resolve_ratios(model.clone(masking="none", ic_ratio=0.0, mim_ratio=0.0), cfg) == (0.5, 0.5)
  assert masking.resolve_ratios(model.clone(ic_ratio=0.25, mim_ratio=0.75), cfg) == (0.25, 0.75)
  cfg.update(ic_ratio=0.3)
  assert masking.resolve_ratios(model.clone(masking="none", ic_ratio=0.0, mim_ratio=0.0), cfg) == (0.3, 0.3)


def test_evaluator_end_to_end_on_a_random_model():
  model, _, params = helpers.eval_model()
  # A CoCa-like model (no masking of its own) is still ranked attentively; the baseline at the 0.5 default.
  ev = _evaluator(model.clone(masking="none", ic_ratio=0.0, mim_ratio=0.0))
  out = ev.run(params)
  assert set(out) == {f"masking/{k}" for k in (
      "ic_object_recall", "ic_object_recall_random", "ic_object_precision", "ic_object_precision_random",
      "ic_scene_object_recall", "mim_object_hidden", "mim_object_hidden_random", "object_fraction",
      "ic_keep_fraction", "num_pairs", "ic_object_recall_other_caption")}
  assert out["masking/ic_keep_fraction"] == 0.5
  assert out["masking/num_pairs"] == ev.pair_valid.sum()
  for k, v in out.items():
    if k != "masking/num_pairs":
      assert 0.0 <= v <= 1.0, k
  assert out["masking/ic_object_recall_random"] == pytest.approx(0.5, abs=0.15)
  assert ev.run(params) == out  # the random baseline is the same draw every run


def test_a_ranking_that_ignores_the_caption_finds_as_much_with_another_scenes_caption():
  """ic_object_recall_other_caption: the IC set chosen by another scene's caption. With every word's head vector the
  same, the words score ranks an image's patches alike for any caption, so the two recalls are equal; with distinct
  word vectors the caption changes the ranking and they differ."""
  model, _, _ = helpers.eval_model()
  model = model.clone(words_head=True, mask_score="words")
  params = helpers.random_params(model)
  ev = _evaluator(model)
  assert not np.array_equal(ev.other_texts, ev.texts) and np.array_equal(ev.other_texts[1], ev.texts[0])
  guided = ev.run(params)
  kernel = params["word_head"]["kernel"]
  same = dict(params, word_head=dict(params["word_head"], kernel=np.repeat(np.asarray(kernel[:, :1]), kernel.shape[1],
                                                                        axis=1)))
  blind = ev.run(same)
  assert blind["masking/ic_object_recall_other_caption"] == blind["masking/ic_object_recall"]
  assert guided["masking/ic_object_recall_other_caption"] != guided["masking/ic_object_recall"]


def test_the_nouns_score_ranks_what_the_model_ranks_in_training():
  """masking.score='nouns' (build_model gives the model the scenes' noun ids): the evaluator's IC sets are the top
  patches of masking.noun_scores on the image's patch embeddings and the head's parameters."""
  from sycoca_jax.models import sycoca  # pylint: disable=g-import-not-at-top
  model, cfg, _ = helpers.eval_model()
  cfg.update(words_head=True)
  cfg.masking.update(score="nouns")
  model = sycoca.build_model(cfg)
  assert len(model.noun_ids) == len(scenes_lib.NOUNS)
  params = helpers.random_params(model)
  ev = _evaluator(model)
  images = np.stack([ev.images.split.source[i]["image"] for i in range(4)])
  texts = ev.texts[:4]
  got = model.clone(ic_ratio=ev.ic_ratio, mim_ratio=ev.mim_ratio).apply(
      {"params": params}, images, texts, jax.random.PRNGKey(0), method=masking._pair_masks)["ic_keep"]
  patches = np.asarray(model.apply({"params": params}, images, method=sycoca.SyCoCa.encode_image)["patch_embeddings"])
  flat = texts.reshape(-1, texts.shape[-1])
  scores = masking_lib.noun_scores(np.repeat(patches, texts.shape[1], axis=0), params["word_head"]["kernel"],
                                   params["word_head"]["bias"], flat, np.asarray(model.noun_ids),
                                   (flat != 0) & (np.arange(flat.shape[1]) > 0))
  want = masking_lib.masks_from_scores(scores, ev.ic_ratio, ev.mim_ratio).ic_keep
  np.testing.assert_array_equal(np.asarray(got).reshape(want.shape), want)
