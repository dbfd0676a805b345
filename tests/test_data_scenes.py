"""The built-in scenes: determinism, captions true to the scene graph, held-out pairs, negatives, VQA."""

import dataclasses
import re

import numpy as np
import pytest

from sycoca_jax.data import scenes
from sycoca_jax.data import tokenizers

_COLOUR_OF = {w: c for c, words in scenes.COLOUR_WORDS.items() for w in words}
_SHAPE_OF = {w: s for s, words in scenes.SHAPE_WORDS.items() for w in words}
_SHAPE_OF |= {scenes.SHAPE_PLURALS[w]: s for w, s in list(_SHAPE_OF.items())}
_SHAPE_OF |= {f"{d}s": d for d in scenes.DIGITS}


def _mentions(caption: str) -> list[tuple[str | None, str]]:
  """(colour or None, shape) for every noun in a caption, read back from the words alone."""
  words = re.sub(r"\b(digit|number) (\d)\b", r"\2", caption).replace(",", " ").split()
  found = []
  for k, w in enumerate(words):
    shape = w if w in scenes.DIGITS else _SHAPE_OF.get(w)
    if shape is not None:
      found.append((_COLOUR_OF.get(words[k - 1]) if k else None, shape))
  return found


def test_scene_is_a_pure_function_of_seed_split_index():
  a = scenes.ScenesSource("train", seed=3, image_size=64)
  b = scenes.ScenesSource("train", seed=3, image_size=64)
  for i in (5, 0, 123456, 5):  # any order, any index
    ea, eb = a[i], b[i]
    np.testing.assert_array_equal(ea["image"], eb["image"])
    assert ea["captions"] == eb["captions"]
  assert a.scene(7) != scenes.ScenesSource("train", seed=4).scene(7)
  assert a.scene(7) != scenes.ScenesSource("test", seed=3).scene(7)


def test_captions_agree_with_scene_graph():
  source = scenes.ScenesSource("train", image_size=32)
  for i in range(300):
    scene = source.scene(i)
    objects = {(o.colour, o.shape) for o in scene.objects}
    for caption in scenes.scene_captions(scene, 5):
      mentions = _mentions(caption)
      assert mentions or re.search(r"\b(objects?|shapes?|things?)\b", caption), caption
      for colour, shape in mentions:
        if colour is None:
          assert shape in {s for _, s in objects}, (caption, objects)
        else:
          assert (colour, shape) in objects, (caption, objects)
      for word, n in zip(scenes.NUMBER_WORDS, range(5)):  # "two squares": exactly two
        m = re.search(rf"\b{word} (\w+) (\w+)\b", caption)
        if m and m.group(2) in _SHAPE_OF and m.group(1) in _COLOUR_OF and n > 1:
          count = sum((o.colour, o.shape) == (_COLOUR_OF[m.group(1)], _SHAPE_OF[m.group(2)]) for o in scene.objects)
          assert count == n, (caption, scene.objects)


def test_every_caption_claim_holds_and_positions_are_right():
  rng = np.random.default_rng(0)
  for i in range(200):
    scene = scenes.sample_scene(0, "train", i)
    for _ in range(5):
      assert scenes.claim_holds(scene, scenes._sample_claim(scene, rng, None))
    for o in scene.objects:  # the drawn centre lies in the cell the graph names
      assert int(o.cx * 3) == o.col and int(o.cy * 3) == o.row


def test_held_out_pairs_never_in_train_and_always_in_test_comp():
  assert len(scenes.HELD_OUT_PAIRS) == len(scenes.KINDS)
  assert {c for _, c in scenes.HELD_OUT_PAIRS} == set(scenes.COLOUR_NAMES)  # every colour loses a kind
  seen = set()
  for i in range(4000):
    seen |= {(o.shape, o.colour) for o in scenes.sample_scene(0, "train", i).objects}
  assert not seen & scenes.HELD_OUT_PAIRS
  assert len(seen) == len(scenes.KINDS) * len(scenes.COLOUR_NAMES) - len(scenes.HELD_OUT_PAIRS)
  for i in range(100):
    scene = scenes.sample_scene(0, "test_comp", i)
    held = (scene.objects[0].colour, scene.objects[0].shape)
    assert (held[1], held[0]) in scenes.HELD_OUT_PAIRS
    for caption in scenes.scene_captions(scene, 5):  # every caption is about the held-out object
      assert held in _mentions(caption), caption


def test_eval_splits_are_fixed_size_and_zero_shot_labels_balanced():
  assert len(scenes.ScenesSource("test")) == 1000
  assert len(scenes.ScenesSource("test_comp")) == 1000
  for split, (classes, templates, attribute) in scenes.ZEROSHOT.items():
    source = scenes.ScenesSource(split, image_size=32)
    labels = [source[i]["label"] for i in range(len(classes) * 2)]
    assert labels == list(range(len(classes))) * 2
    obj = source.scene(3).objects[0]
    assert getattr(obj, attribute) == classes[3] and len(source.scene(3).objects) == 1
    assert all("{}" in t for t in templates)


def test_validation_twins_draw_other_scenes_of_the_same_kind():
  for test_split, val_split in (("test", "val"), ("zeroshot_shape", "zeroshot_shape_val"),
                                ("zeroshot_digit", "zeroshot_digit_val")):
    test, val = scenes.ScenesSource(test_split, image_size=32), scenes.ScenesSource(val_split, image_size=32)
    assert len(val) == len(test)
    assert not {test.scene(i).objects for i in range(50)} & {val.scene(i).objects for i in range(50)}
    if test_split in scenes.ZEROSHOT:
      assert [val[i]["label"] for i in range(20)] == [test[i]["label"] for i in range(20)]
      assert val.class_names == test.class_names and val.templates == test.templates
  # The held-out colour-shape pairs stay out of the validation scenes, as out of test.
  val = scenes.ScenesSource("val")
  assert not any((o.shape, o.colour) in scenes.HELD_OUT_PAIRS for i in range(200) for o in val.scene(i).objects)


def test_zero_shot_prompts_are_worded_like_training_captions():
  """A prompt word the captions never use (a full stop, 'something') has an untrained embedding."""
  caption_words = {w for i in range(2000) for c in scenes.scene_captions(scenes.sample_scene(0, "train", i))
                   for w in c.replace(",", " , ").split()}
  for classes, templates, _ in scenes.ZEROSHOT.values():
    for name in classes:
      for template in templates:
        unseen = set(template.format(name).split()) - caption_words
        assert not unseen, (template.format(name), unseen)


@pytest.mark.parametrize("size", [64, 224, 288])
def test_render_sizes_and_patch_masks(size):
  source = scenes.ScenesSource("test", image_size=size, patch_size=size // 16)
  element = source[11]
  scene = source.scene(11)
  assert element["image"].shape == (size, size, 3) and element["image"].dtype == np.uint8
  patches = element["object_patches"]
  assert patches.shape == (len(scene.objects), 16, 16)
  for obj, cover in zip(scene.objects, patches):
    r, c = np.unravel_index(np.argmax(cover), cover.shape)
    assert cover.max() > 0.3
    assert r * 3 // 16 == obj.row and c * 3 // 16 == obj.col  # the covered patches sit in the object's cell
  _, masks = scenes.render_scene(scene, size, with_masks=True)
  for obj, mask in zip(scene.objects, masks):  # object pixels carry the object's colour (edges antialiased)
    exact = (element["image"][mask] == scenes.COLOURS[obj.colour]).all(-1)
    assert exact.mean() > 0.4, (obj, exact.mean())


def test_negatives_are_false_and_differ_in_one_place():
  rng = np.random.default_rng(1)
  made = {k: 0 for k in scenes.NEGATIVE_KINDS}
  for i in range(60):
    scene = scenes.sample_scene(0, "test", i)
    for kind in scenes.NEGATIVE_KINDS:
      pair = scenes.negative_caption(scene, kind, rng)
      if pair is None:
        assert kind == "relation" and len(scene.objects) == 1
        continue
      positive, negative = pair
      assert positive != negative
      made[kind] += 1
      if kind in ("attribute", "object"):
        a, b = ([w for w in t.split() if w not in ("a", "an")] for t in pair)  # "a green" -> "an orange"
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, pair
  assert min(made.values()) > 20


def test_hard_negative_twins_are_false_and_change_the_kind_only():
  source = scenes.ScenesSource("train", hard_negatives=("object",))
  kinds = (set(scenes.KINDS) | {w for words in scenes.SHAPE_WORDS.values() for w in words}
           | set(scenes.SHAPE_PLURALS.values()) | {d + "s" for d in scenes.DIGITS})
  twins = 0
  for i in range(30):
    element = source[i]
    assert element["captions"] == source[i]["captions"]  # a pure function of the index, twins too
    for caption, twin in zip(element["captions"], element["hard_negatives"]):
      if twin == caption:  # the scene had nothing of the kind: a plain caption, no twin
        continue
      twins += 1
      a, b = ([w for w in t.split() if w not in ("a", "an")] for t in (caption, twin))
      changed = [(x, y) for x, y in zip(a, b) if x != y]
      assert len(a) == len(b) and len(changed) == 1 and set(changed[0]) <= kinds, (caption, twin)
  assert twins >= 100
  assert "hard_negatives" not in scenes.ScenesSource("train")[0]
  with pytest.raises(ValueError, match=r"config.data.scenes.hard_negatives: \['colour'\]"):
    scenes.ScenesSource("train", hard_negatives=("colour",))


def test_twin_scenes_change_one_kind_and_each_caption_names_its_own():
  source = scenes.ScenesSource("train", twins=True)
  counted = 0
  for i in range(40):
    scene, twin, (caption, twin_caption) = source.twin_pair(i)
    changed = [k for k, (a, b) in enumerate(zip(scene.objects, twin.objects)) if a != b]
    assert len(changed) == 1 and twin.background == scene.background, i
    old, new = scene.objects[changed[0]], twin.objects[changed[0]]
    assert old.shape != new.shape and old.is_digit == new.is_digit
    assert dataclasses.replace(old, shape=new.shape) == new  # colour, size, place, fill and rotation kept
    # Records 2i and 2i + 1: the two images with their captions, a pure function of the index.
    assert source[2 * i]["captions"] == [caption] and source[2 * i + 1]["captions"] == [twin_caption]
    np.testing.assert_array_equal(source[2 * i + 1]["image"], scenes.render_scene(twin, 64))
    # The images differ where the changed object is drawn in either, and nowhere else (its masks' antialiased
    # edges: one pixel around them).
    (image, masks), (twin_image, twin_masks) = (scenes.render_scene(s, 64, with_masks=True) for s in (scene, twin))
    drawn = np.pad(masks[changed[0]] | twin_masks[changed[0]], 1)
    near = np.zeros_like(drawn)
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        near |= np.roll(drawn, (dy, dx), axis=(0, 1))
    differs = (image != twin_image).any(-1)
    assert differs.any() and not (differs & ~near[1:-1, 1:-1]).any(), i
    # Each caption names the changed object by its own scene's kind, and the two say the same otherwise.
    mentions, twin_mentions = _mentions(caption), _mentions(twin_caption)
    assert (old.colour, old.shape) in mentions and (old.colour, new.shape) in twin_mentions, (caption, twin_caption)
    assert caption != twin_caption and len(mentions) == len(twin_mentions)
    counted += 1
  assert counted == 40
  with pytest.raises(ValueError, match="config.data.scenes.twins"):
    scenes.ScenesSource("train", twins=True, hard_negatives=("object",))


def test_vqa_answers_are_correct():
  for i in range(100):
    scene = scenes.sample_scene(0, "test", i)
    for question, answer in scenes.vqa_pairs(scene):
      assert answer in scenes.VQA_ANSWERS
      if question == "how many objects are there ?":
        assert answer == scenes.NUMBER_WORDS[len(scene.objects)]
      m = re.match(r"what color is the (?:digit )?(\w+) \?", question)
      if m:
        shape = _SHAPE_OF.get(m.group(1), m.group(1))
        assert [o.colour for o in scene.objects if o.shape == shape] == [answer]


def test_word_vocabulary_covers_captions_questions_and_negatives():
  tok = tokenizers.get_tokenizer("scenes_words", max_len=64)
  rng = np.random.default_rng(0)
  for split in ("train", "test_comp", "zeroshot_digit"):
    for i in range(80):
      scene = scenes.sample_scene(0, split, i)
      texts = scenes.scene_captions(scene, 5) + [w for qa in scenes.vqa_pairs(scene) for w in qa]
      texts += [t for k in scenes.NEGATIVE_KINDS for t in scenes.negative_caption(scene, k, rng) or ()]
      ids = tok.encode(texts)
      assert not (ids == tok.unk_id).any(), [t for t, row in zip(texts, ids) if (row == tok.unk_id).any()]
  assert tok.vocab_size == len(scenes.vocabulary()) + 4


def test_backgrounds_restrict_the_kinds_and_keep_the_objects():
  kinds = ("gradient", "texture")
  for i in range(30):
    full, restricted = scenes.sample_scene(0, "train", i), scenes.sample_scene(0, "train", i, backgrounds=kinds)
    assert restricted.objects == full.objects and restricted.background["kind"] in kinds
  source = scenes.ScenesSource("test", image_size=32, backgrounds=kinds)
  assert {source.scene(i).background["kind"] for i in range(30)} == set(kinds)
  with pytest.raises(ValueError, match="backgrounds"):
    scenes.sample_scene(0, "train", 0, backgrounds=("plaid",))
