"""The supervised object probe runs on a runlocal config and learns a label that is plain to see."""

import math

import jax
import numpy as np
import pytest

from sycoca_jax.tools import object_probe
from tests.helpers import small_train_config


@pytest.mark.slow(reason="80 training steps")
@pytest.mark.parametrize("tower", ["vit", "cnn"])
def test_probe_learns_colour_of_large_objects_on_smooth_backgrounds(tower):
  config = small_train_config(global_batch_size=32)
  config.data.scenes.backgrounds = ("gradient",)
  config.optim.update(lr=3e-3, warmup_steps=5)
  rows = list(object_probe.probe(config, steps=80, label="colour", size="large", every=20, tower=tower))
  assert [r["step"] for r in rows] == [20, 40, 60, 80]
  # Fresh scenes every step, so a falling loss is a held-out one; chance is ln 12 = 2.48 nats.
  assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["loss"] < math.log(12) - 0.05, rows


def test_probe_names_the_towers_it_knows():
  with pytest.raises(ValueError, match="tower='resnet'.*cnn"):
    next(object_probe.probe(small_train_config(), steps=1, tower="resnet"))


def test_cluttered_labels_name_the_kinds_in_the_scene():
  from sycoca_jax.data import scenes  # pylint: disable=g-import-not-at-top
  config = small_train_config()
  config.data.scenes.update(min_objects=2, max_objects=4)
  images, every = object_probe._batch(config, "kind", "", 5, 6, clutter="all")  # pylint: disable=protected-access
  _, one = object_probe._batch(config, "kind", "", 5, 6, clutter="one")  # pylint: disable=protected-access
  assert images.shape == (6, config.data.image_size, config.data.image_size, 3) and every.shape == (6, 18)
  for row, i in enumerate(range(5, 11)):
    scene = scenes.sample_scene(config.data.seed, "train", i, min_objects=2, max_objects=4,
                                backgrounds=tuple(config.data.scenes.backgrounds))
    kinds = {scenes.KINDS.index(o.shape) for o in scene.objects}
    assert set(np.flatnonzero(every[row])) == kinds and one[row] in kinds
  with pytest.raises(ValueError, match="clutter='all'.*label='kind'"):
    next(object_probe.probe(config, steps=1, label="colour", clutter="all"))


@pytest.mark.slow(reason="trains the probe on cluttered scenes for two steps and scores 300 test scenes")
def test_cluttered_probe_is_scored_on_one_object_test_scenes():
  config = small_train_config(global_batch_size=8)
  rows = list(object_probe.probe(config, steps=2, every=1, clutter="all"))
  assert [r["step"] for r in rows] == [1, 2]
  from sycoca_jax.data import scenes  # pylint: disable=g-import-not-at-top
  from sycoca_jax import pixels  # pylint: disable=g-import-not-at-top
  from sycoca_jax.models import sycoca  # pylint: disable=g-import-not-at-top
  tests = [scenes.sample_scene(config.data.seed, "test", i, min_objects=1, max_objects=1,
                               backgrounds=tuple(config.data.scenes.backgrounds)) for i in range(300)]
  images = np.stack([pixels.normalize(np.asarray(scenes.render_scene(t, config.data.image_size))) for t in tests])
  truth = np.array([scenes.KINDS.index(t.objects[0].shape) for t in tests])
  digits = int((truth >= 8).sum())
  head = object_probe._Probe(sycoca.build_model(config.model).image_encoder, 18)  # pylint: disable=protected-access
  for row in rows:  # each row's params name the 300 test scenes' kinds with its accuracy, shapes and digits apart
    guess = np.asarray(jax.jit(head.apply)({"params": row["params"]}, images)).argmax(-1)
    assert row["accuracy"] == pytest.approx(np.mean(guess == truth), abs=1e-9)
    mixed = ((300 - digits) * row["shape_accuracy"] + digits * row["digit_accuracy"]) / 300
    assert row["accuracy"] == pytest.approx(mixed), row


@pytest.mark.slow(reason="reads the shared trained run and trains two probes for a few steps")
def test_frozen_probe_starts_from_a_run_and_trains_the_head_only(trained_run):
  from sycoca_jax import checkpoint  # pylint: disable=g-import-not-at-top
  _, saved, _ = checkpoint.load_params(trained_run)
  config = small_train_config(global_batch_size=8)
  rows = list(object_probe.probe(config, steps=3, every=1, weights=str(trained_run), frozen=True))
  for row in rows:  # the run's tower, unchanged at every step
    jax.tree.map(np.testing.assert_array_equal, row["params"]["image_encoder"], saved["image_encoder"])
  assert not np.array_equal(rows[0]["params"]["Dense_0"]["kernel"], rows[-1]["params"]["Dense_0"]["kernel"])
  for row in rows:  # the kind label's accuracy on all 8 examples of the step, and on its shapes and digits apart
    _, labels = object_probe._batch(config, "kind", "", 8 * (row["step"] - 1), 8)  # pylint: disable=protected-access
    digits = int((labels >= 8).sum())  # KINDS: the 8 shapes, then the 10 digits
    assert 0 < digits < 8
    mixed = ((8 - digits) * row["shape_accuracy"] + digits * row["digit_accuracy"]) / 8
    assert row["accuracy"] == pytest.approx(mixed), row
  # Without --frozen the same start trains the tower too.
  tuned = list(object_probe.probe(config, steps=1, every=1, weights=str(trained_run)))[-1]["params"]
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tuned["image_encoder"]),
                                                      jax.tree.leaves(saved["image_encoder"])))


@pytest.mark.slow(reason="reads the shared trained run and embeds a few hundred captions")
def test_twin_similarity_is_the_text_towers_cosine_of_caption_and_twin(trained_run):
  from sycoca_jax import checkpoint, data  # pylint: disable=g-import-not-at-top
  from sycoca_jax.data import scenes  # pylint: disable=g-import-not-at-top
  from sycoca_jax.models import sycoca  # pylint: disable=g-import-not-at-top
  rows = object_probe.twin_similarity(small_train_config(), str(trained_run), scenes=4)
  assert list(rows) == list(scenes.NEGATIVE_KINDS)
  # Against the embeddings computed here, for the object-kind twins of those four scenes.
  config, params, _ = checkpoint.load_params(trained_run)
  model, tokenizer = sycoca.build_model(config.model), data.tokenizer_from_config(config.data)
  source = scenes.ScenesSource("train", hard_negatives=("object",))
  pairs = [(c, n) for i in range(4) for c, n in zip(*source.caption_pairs(source.scene(i))) if c != n]
  embed = lambda texts: np.asarray(model.apply({"params": params}, tokenizer.encode(list(texts)),
                                               method=sycoca.SyCoCa.encode_text)["embedding"])
  captions, twins = embed(c for c, _ in pairs), embed(n for _, n in pairs)
  twin, other, count = rows["object"]
  assert count == len(pairs) > 0
  np.testing.assert_allclose(twin, (captions * twins).sum(-1).mean(), rtol=1e-4)
  np.testing.assert_allclose(other, (captions * np.roll(captions, 1, axis=0)).sum(-1).mean(), rtol=1e-4)
  assert -1 <= other < twin < 1


@pytest.mark.slow(reason="reads the shared trained run and scores 18 kinds' prompts for a few scenes")
def test_captioner_names_each_kind_by_the_likelihood_of_its_caption(trained_run):
  from sycoca_jax import inference  # pylint: disable=g-import-not-at-top
  from sycoca_jax.data import scenes  # pylint: disable=g-import-not-at-top
  row = object_probe.captioner_kinds(str(trained_run), scenes=6)
  assert row["scores"].shape == (6, len(scenes.KINDS))
  # Every score is the caption likelihood of a prompt read as the captions are, the kind's best word.
  model = inference.load(str(trained_run))
  scene = scenes.sample_scene(0, "test", 2, min_objects=1, max_objects=1)
  image, colour = np.asarray(scenes.render_scene(scene, model.image_size)), scene.objects[0].colour
  assert scenes.KINDS[row["truth"][2]] == scene.objects[0].shape
  for k in ("square", "7"):
    prompts = [f"a {colour} {w}" for w in object_probe.kind_words(k)]
    best = max(model.score(image, [p])["log_likelihood"][0] for p in prompts)
    np.testing.assert_allclose(row["scores"][2, scenes.KINDS.index(k)], best, rtol=1e-5)
  assert object_probe.kind_words("square") == ("square", "box") and "digit 7" in object_probe.kind_words("7")
  correct = row["scores"].argmax(1) == row["truth"]
  digit = row["truth"] >= len(scenes.SHAPES)
  assert digit.any() and not digit.all()  # these six scenes draw both halves of the kinds
  assert row["accuracy"] == pytest.approx(correct.mean())
  halves = (correct[~digit].mean(), correct[digit].mean())
  assert (row["shape_accuracy"], row["digit_accuracy"]) == pytest.approx(halves)


@pytest.mark.slow(reason="initialises a tiny model with a caption-words head and encodes a few scenes")
@pytest.mark.parametrize("pool", ["mean", "max"])
def test_words_head_names_each_kind_by_its_best_words_standardised_logit(tmp_path, pool):
  from sycoca_jax import checkpoint, inference  # pylint: disable=g-import-not-at-top
  from sycoca_jax.data import scenes  # pylint: disable=g-import-not-at-top
  from sycoca_jax.models import sycoca  # pylint: disable=g-import-not-at-top
  from sycoca_jax.models.sycoca import SyCoCa  # pylint: disable=g-import-not-at-top
  config = small_train_config(**{"model.words_head": True, "model.words_pool": pool, "model.vision.pool": "gap"})
  params = sycoca.init_params(sycoca.build_model(config.model), jax.random.PRNGKey(0))
  checkpoint.save_params(str(tmp_path / "run"), params, config)
  row = object_probe.words_head_kinds(str(tmp_path / "run"), scenes=12)
  # The same from the parameters by hand: the head's logits from the pooled image embedding (mean), or each patch
  # embedding's and their max over the patches (max) -> each kind's best word.
  model = inference.load(str(tmp_path / "run"))
  objects = [scenes.sample_scene(0, "test", i, min_objects=1, max_objects=1) for i in range(12)]
  images = np.stack([np.asarray(scenes.render_scene(s, model.image_size)) for s in objects])
  image = model.model.apply({"params": model.params}, images, method=SyCoCa.encode_image)
  kernel, bias = np.asarray(params["word_head"]["kernel"]), np.asarray(params["word_head"]["bias"])
  if pool == "max":
    logits = (np.asarray(image["patch_embeddings"]) @ kernel + bias).max(1)
  else:
    logits = np.asarray(image["pooled"]) @ kernel + bias
  words = model.tokenizer.words
  best = np.stack([logits[:, [words.index(w.split()[-1]) for w in object_probe.kind_words(k)]].max(1)
                   for k in scenes.KINDS], 1)
  np.testing.assert_allclose(row["scores"], (best - best.mean(0)) / best.std(0), rtol=1e-4, atol=1e-4)
  truth = [scenes.KINDS.index(s.objects[0].shape) for s in objects]
  assert row["truth"].tolist() == truth
  assert row["accuracy"] == pytest.approx(np.mean(row["scores"].argmax(1) == truth))
  colours = np.stack([logits[:, [words.index(w) for w in scenes.COLOUR_WORDS[c]]].max(1)
                      for c in scenes.COLOUR_NAMES], 1)
  colour_truth = [scenes.COLOUR_NAMES.index(s.objects[0].colour) for s in objects]
  colour_guess = ((colours - colours.mean(0)) / colours.std(0)).argmax(1)
  assert row["colour_accuracy"] == pytest.approx(np.mean(colour_guess == colour_truth))


def test_words_head_refuses_a_run_without_one(trained_run):
  with pytest.raises(ValueError, match="has no caption-words head"):
    object_probe.words_head_kinds(str(trained_run), scenes=2)
