"""The objectives against NumPy references, gradient flow per ablation, and a single compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax import losses, pixels
from sycoca_jax.models.sycoca import build_model, init_params
from tests.helpers import random_batch
from tests.helpers import random_params
from tests.helpers import tiny_model_config


def _log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_contrastive_loss_matches_numpy():
  rng = np.random.RandomState(0)
  img, txt = rng.randn(5, 8), rng.randn(5, 8)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  logits = 10.0 * img @ txt.T
  want = -(np.trace(_log_softmax(logits, 1)) + np.trace(_log_softmax(logits, 0))) / (2 * 5)
  got = losses.contrastive_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 10.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_hard_negative_loss_is_the_pair_softmax_over_examples_with_a_twin():
  rng = np.random.RandomState(2)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  img, txt, neg = (unit(rng.randn(6, 8)) for _ in range(3))
  valid = np.array([True, True, False, True, False, True])
  pair = 10.0 * np.stack([(img * txt).sum(1), (img * neg).sum(1)], axis=1)  # [B, 2]: caption, twin
  want = -_log_softmax(pair)[valid, 0].mean()
  got = losses.hard_negative_loss(*(jnp.asarray(x, jnp.float32) for x in (img, txt, neg)), 10.0, jnp.asarray(valid))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  none = losses.hard_negative_loss(*(jnp.asarray(x, jnp.float32) for x in (img, txt, neg)), 10.0,
                                   jnp.zeros(6, bool))
  assert float(none) == 0.0  # a batch without twins adds nothing
  # It trains the image side only: the texts get no gradient from it (they would collapse the pair).
  grads = jax.grad(losses.hard_negative_loss, argnums=(0, 1, 2))(
      *(jnp.asarray(x, jnp.float32) for x in (img, txt, neg)), 10.0, jnp.asarray(valid))
  assert np.abs(grads[0]).max() > 0.1 and not np.any(grads[1]) and not np.any(grads[2])


def test_twin_text_loss_keeps_caption_and_twin_apart_and_trains_the_texts_only():
  rng = np.random.RandomState(3)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  txt, neg = (unit(rng.randn(5, 8)) for _ in range(2))
  valid = np.array([True, False, True, True, True])
  want = np.log1p(np.exp(10.0 * ((txt * neg).sum(1) - 1.0)))[valid].mean()
  args = lambda t: (jnp.asarray(txt, jnp.float32), jnp.asarray(neg, jnp.float32), t, jnp.asarray(valid))
  np.testing.assert_allclose(losses.twin_text_loss(*args(10.0)), want, rtol=1e-5)
  g_txt, g_neg, g_t = jax.grad(lambda a, b, t: losses.twin_text_loss(a, b, t, jnp.asarray(valid)),
                               argnums=(0, 1, 2))(*args(jnp.float32(10.0))[:3])
  assert float(g_t) == 0.0 and not np.any(np.asarray(g_txt)[1])  # no temperature, no invalid row
  # A step down its gradient moves each valid pair apart.
  moved = (unit(txt - 0.01 * np.asarray(g_txt)) * unit(neg - 0.01 * np.asarray(g_neg))).sum(1)
  assert np.all(moved[valid] < (txt * neg).sum(1)[valid])


def test_twin_columns_loss_plus_itc_is_negclip():
  """ITC + 0.5 * twin_columns_loss = NegCLIP's loss: the image -> text softmax over the captions and the valid twins,
  averaged with the text -> image softmax over the images; both towers get gradient through the twins."""
  rng = np.random.RandomState(4)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  img, txt, neg = (unit(rng.randn(6, 8)) for _ in range(3))
  valid = np.array([True, False, True, True, False, True])
  logits = 10.0 * img @ np.concatenate([txt, neg[valid]]).T  # [B, B + twins]
  negclip = -(np.trace(_log_softmax(logits, 1)[:, :6]) + np.trace(_log_softmax(10.0 * img @ txt.T, 0))) / (2 * 6)
  args = [jnp.asarray(x, jnp.float32) for x in (img, txt, neg)]
  got = losses.contrastive_loss(*args[:2], 10.0) + 0.5 * losses.twin_columns_loss(*args, 10.0, jnp.asarray(valid))
  np.testing.assert_allclose(got, negclip, rtol=1e-5)
  assert float(losses.twin_columns_loss(*args, 10.0, jnp.zeros(6, bool))) == 0.0  # no twins, no term
  g_img, g_txt, g_neg = jax.grad(losses.twin_columns_loss, argnums=(0, 1, 2))(*args, 10.0, jnp.asarray(valid))
  assert np.abs(g_img).min(axis=1).max() > 0 and np.abs(g_txt).max() > 0.01
  assert np.all(np.abs(g_neg).max(axis=1)[valid] > 0.01) and not np.any(np.asarray(g_neg)[~valid])


def test_caption_loss_ignores_padding():
  rng = np.random.RandomState(1)
  text = np.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
  logits = rng.randn(2, 5, 9).astype(np.float32)
  labels = text[:, 1:]
  logp = _log_softmax(logits)
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  real = labels != 0
  want = nll[real].mean()
  got, count = losses.caption_loss(jnp.asarray(logits), jnp.asarray(text), pad_id=0)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert int(count) == real.sum() == 5
  # Garbage logits at padded positions change nothing.
  logits[~real] = 100.0
  np.testing.assert_allclose(losses.caption_loss(jnp.asarray(logits), jnp.asarray(text), 0)[0], want, rtol=1e-5)


def test_words_loss_is_the_cross_entropy_against_the_captions_distinct_words():
  rng = np.random.RandomState(3)
  text = np.array([[1, 5, 6, 5, 2, 0], [1, 7, 2, 0, 0, 0], [1, 1, 4, 2, 0, 0]])  # bos ... eos pad
  logits = rng.randn(3, 9).astype(np.float32)
  # Each distinct word after the start token (the end token too) shares probability 1; a repeated word counts
  # once, padding not at all; a start-token id later in the row is a word like any other.
  target = np.zeros((3, 9))
  for row, words in enumerate(([5, 6, 2], [7, 2], [1, 4, 2])):
    target[row, words] = 1 / len(words)
  want = -(target * _log_softmax(logits)).sum(1).mean()
  loss, count = losses.words_loss(jnp.asarray(logits), jnp.asarray(text), pad_id=0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert count == 3
  grad = jax.grad(lambda z: losses.words_loss(z, jnp.asarray(text), 0)[0])(jnp.asarray(logits))
  np.testing.assert_allclose(grad, (np.exp(_log_softmax(logits)) - target) / 3, rtol=1e-4, atol=1e-7)


def test_words_loss_over_a_vocabulary_skips_captions_without_its_words():
  rng = np.random.RandomState(4)
  text = np.array([[1, 5, 6, 5, 2, 0], [1, 7, 2, 0, 0, 0], [1, 1, 4, 6, 2, 0]])
  logits = rng.randn(3, 9).astype(np.float32)
  vocab = np.zeros(9, np.float32)
  vocab[[5, 6]] = 1   # the second caption holds neither word: it adds nothing, and the mean is over two captions
  target = np.zeros((3, 9))
  target[0, [5, 6]] = 0.5
  target[2, 6] = 1.0
  want = -(target * _log_softmax(logits)).sum(1)[[0, 2]].mean()
  loss, count = losses.words_loss(jnp.asarray(logits), jnp.asarray(text), 0, jnp.asarray(vocab))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert count == 2


def test_words_loss_with_its_softmax_over_the_vocabulary_is_a_classifier_over_those_words():
  rng = np.random.RandomState(5)
  text = np.array([[1, 5, 6, 5, 2, 0], [1, 7, 2, 0, 0, 0], [1, 1, 4, 6, 2, 0]])
  logits = rng.randn(3, 9).astype(np.float32)
  vocab = np.zeros(9, np.float32)
  vocab[[5, 6, 8]] = 1
  target = np.zeros((3, 3))   # over the vocabulary's words 5, 6, 8; the second caption holds none
  target[0, [0, 1]] = 0.5
  target[2, 1] = 1.0
  want = -(target * _log_softmax(logits[:, [5, 6, 8]])).sum(1)[[0, 2]].mean()
  loss_fn = lambda z: losses.words_loss(z, jnp.asarray(text), 0, jnp.asarray(vocab), softmax_over_vocab=True)
  loss, count = loss_fn(jnp.asarray(logits))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert count == 2
  # The words outside the vocabulary get no gradient: nothing trains them down, whatever their logits.
  grad = np.asarray(jax.grad(lambda z: loss_fn(z)[0])(jnp.asarray(logits)))
  assert np.all(grad[:, [0, 1, 2, 3, 4, 7]] == 0)
  want_grad = (np.exp(_log_softmax(logits[:, [5, 6, 8]])) - target) / 2
  want_grad[1] = 0
  np.testing.assert_allclose(grad[:, [5, 6, 8]], want_grad, rtol=1e-4, atol=1e-7)
  # Over every word, the same logits give another loss (the other words' mass counts against the caption's).
  assert abs(float(losses.words_loss(jnp.asarray(logits), jnp.asarray(text), 0, jnp.asarray(vocab))[0]) - want) > 0.1
  with pytest.raises(ValueError, match="softmax_over_vocab needs a vocab"):
    losses.words_loss(jnp.asarray(logits), jnp.asarray(text), 0, softmax_over_vocab=True)


def test_words_loss_with_one_softmax_per_group_sums_each_groups_classifier():
  rng = np.random.RandomState(6)
  # Groups {3, 4} and {5, 6, 7}; the first caption holds a word of each, the second of the second group alone, the
  # third of neither (word 8 is in no group).
  text = np.array([[1, 3, 6, 7, 2, 0], [1, 5, 8, 2, 0, 0], [1, 8, 2, 0, 0, 0]])
  logits = rng.randn(3, 9).astype(np.float32)
  groups = np.zeros((2, 9), np.float32)
  groups[0, [3, 4]] = 1
  groups[1, [5, 6, 7]] = 1
  first, second = _log_softmax(logits[:, [3, 4]]), _log_softmax(logits[:, [5, 6, 7]])
  want = (-first[0, 0] - 0.5 * (second[0, 1] + second[0, 2]) - second[1, 0]) / 2
  loss_fn = lambda z: losses.words_loss(z, jnp.asarray(text), 0, jnp.asarray(groups), softmax_over_vocab=True)
  loss, count = loss_fn(jnp.asarray(logits))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert count == 2
  # Each group's softmax alone: a group's logits do not move the other group's probabilities.
  grad = np.asarray(jax.grad(lambda z: loss_fn(z)[0])(jnp.asarray(logits)))
  np.testing.assert_allclose(grad[0, [3, 4]], (np.exp(first[0]) - [1, 0]) / 2, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grad[1, [3, 4]], 0, atol=0)
  np.testing.assert_allclose(grad[1, [5, 6, 7]], (np.exp(second[1]) - [1, 0, 0]) / 2, rtol=1e-4, atol=1e-7)
  assert np.all(grad[:, [0, 1, 2, 8]] == 0) and np.all(grad[2] == 0)
  # One softmax over the union is another loss; a single group is loss.words_softmax='vocab'.
  union = groups.max(0)
  one = float(losses.words_loss(jnp.asarray(logits), jnp.asarray(text), 0, jnp.asarray(union), True)[0])
  assert abs(one - want) > 0.1
  np.testing.assert_allclose(losses.words_loss(jnp.asarray(logits), jnp.asarray(text), 0, jnp.asarray(union[None]),
                                               True)[0], one, rtol=1e-6)
  # Without the per-group softmax, the groups count as their union.
  np.testing.assert_allclose(losses.words_loss(jnp.asarray(logits), jnp.asarray(text), 0, jnp.asarray(groups))[0],
                             losses.words_loss(jnp.asarray(logits), jnp.asarray(text), 0, jnp.asarray(union))[0],
                             rtol=1e-6)


def _token_loss_reference(patch_emb, token_emb, valid, temperature):
  """SPARC's fine-grained term, one example and one token at a time."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  per_example = []
  for p, t, v in zip(unit(patch_emb), unit(token_emb), valid):
    t = t[v]
    if not len(t):
      per_example.append(0.0)
      continue
    groups = []
    for token in t:
      sim = p @ token
      scaled = (sim - sim.min()) / (sim.max() - sim.min())
      weights = np.where(scaled >= 1 / len(p), scaled, 0.0)
      groups.append(unit(weights @ p / weights.sum()))
    logits = temperature * np.stack(groups) @ t.T                # group l against token k
    own = np.diag(logits)
    per_example.append(-0.5 * (own - np.log(np.exp(logits).sum(1)) + own - np.log(np.exp(logits).sum(0))).mean())
  return np.mean(per_example)


def test_token_loss_matches_its_formula_per_example_and_token():
  rng = np.random.RandomState(6)
  patch_emb, token_emb = rng.randn(3, 7, 5), rng.randn(3, 6, 5)
  # Start token and padding excluded; the third caption has no valid token and adds 0 to the batch mean.
  valid = np.array([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  loss = losses.token_loss(jnp.asarray(patch_emb, jnp.float32), jnp.asarray(token_emb, jnp.float32),
                           jnp.asarray(valid), jnp.float32(3.0))
  np.testing.assert_allclose(loss, _token_loss_reference(patch_emb, token_emb, valid, 3.0), rtol=1e-5)
  # Padding's vectors do not matter, and the gradient reaches the patches and the valid tokens only.
  token_emb[~valid] = rng.randn((~valid).sum(), 5)
  loss_fn = lambda p, t: losses.token_loss(p, t, jnp.asarray(valid), jnp.float32(3.0))
  np.testing.assert_allclose(loss_fn(jnp.asarray(patch_emb, jnp.float32), jnp.asarray(token_emb, jnp.float32)), loss,
                             rtol=1e-6)
  g_patch, g_token = jax.grad(loss_fn, argnums=(0, 1))(jnp.asarray(patch_emb, jnp.float32),
                                                      jnp.asarray(token_emb, jnp.float32))
  assert np.all(g_token[~valid] == 0) and np.all(np.abs(g_token[valid]).sum(-1) > 0)
  assert np.all(g_patch[2] == 0) and np.abs(g_patch[:2]).sum() > 0


def test_token_loss_is_low_when_each_token_has_its_own_patch():
  # Each caption token is one patch's vector: its group centres on that patch, and the loss falls towards 0 as
  # the temperature sharpens; random tokens (no patch of their own) cost more.
  rng = np.random.RandomState(7)
  patch_emb = rng.randn(2, 9, 16).astype(np.float32)
  token_emb = patch_emb[:, :4]
  valid = np.ones((2, 4), bool)
  at = lambda t, temp: float(losses.token_loss(jnp.asarray(patch_emb), jnp.asarray(t), jnp.asarray(valid),
                                               jnp.float32(temp)))
  assert at(token_emb, 30.0) < 0.05 < at(token_emb, 3.0) < at(rng.randn(2, 4, 16).astype(np.float32), 3.0)


def test_token_filip_loss_matches_its_formula_caption_by_image():
  rng = np.random.RandomState(8)
  patch_emb, token_emb = rng.randn(4, 5, 6), rng.randn(4, 3, 6)
  valid = np.array([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 0, 1]], bool)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  p, t, temperature = unit(patch_emb), unit(token_emb), 5.0
  text_to_image, image_to_text = np.zeros((4, 4)), np.zeros((4, 4))
  for b in range(4):
    for c in range(4):
      sim = t[b][valid[b]] @ p[c].T                                  # the caption's valid tokens x the patches
      text_to_image[b, c] = sim.max(1).mean()
      image_to_text[c, b] = sim.max(0).mean()
  captions_over_images = -np.diag(_log_softmax(temperature * text_to_image)).mean()
  images_over_captions = -np.diag(_log_softmax(temperature * image_to_text)).mean()
  args = jnp.asarray(patch_emb, jnp.float32), jnp.asarray(token_emb, jnp.float32)
  for image_to_text_half, want in ((True, 0.5 * (captions_over_images + images_over_captions)),
                                   (False, captions_over_images)):                   # 'filip' / 'filip_text'
    loss_fn = lambda p, t: losses.token_filip_loss(p, t, jnp.asarray(valid), jnp.float32(temperature),
                                                   image_to_text=image_to_text_half)
    np.testing.assert_allclose(loss_fn(*args), want, rtol=1e-5)
    g_patch, g_token = jax.grad(loss_fn, argnums=(0, 1))(*args)
    assert np.all(np.isfinite(g_patch)) and np.all(g_token[~valid] == 0)
    assert np.all(np.abs(g_token[valid]).sum(-1) > 0)
  # Captions over images only: a patch that is no token's best in any image gets no gradient.
  sim = np.einsum("ble,cne->bcln", t, p)
  best = np.zeros((4, 5), bool)
  for b in range(4):
    for c in range(4):
      best[c, sim[b, c][valid[b]].argmax(-1)] = True
  assert (~best).any() and np.all(g_patch[~best] == 0) and np.all(np.abs(g_patch[best]).sum(-1) > 0)


def test_token_contrast_loss_leaves_images_whose_caption_holds_the_word_out_of_its_negatives():
  rng = np.random.RandomState(9)
  patch_emb, token_emb = rng.randn(4, 5, 6), rng.randn(4, 4, 6)
  text = np.array([[1, 5, 6, 2], [1, 5, 7, 2], [1, 8, 2, 0], [1, 6, 9, 2]])   # start, words, end, padding
  valid = (text != 0) & (np.arange(4) > 0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  p, t, temperature = unit(patch_emb), unit(token_emb), 5.0
  total, count = 0.0, 0
  for b in range(4):
    for l in np.flatnonzero(valid[b]):
      candidates = [c for c in range(4) if c == b or text[b, l] not in text[c, 1:]]
      if len(candidates) == 1:   # every caption holds the word (here: the end token)
        continue
      logits = np.array([temperature * (t[b, l] @ p[c].T).max() for c in candidates])
      total -= _log_softmax(logits[None])[0, candidates.index(b)]
      count += 1
  assert count == 7   # word 5 has two negatives, 6 two, 7, 8 and 9 three each; the end token none
  loss_fn = lambda p, t: losses.token_contrast_loss(p, t, jnp.asarray(valid), jnp.float32(temperature),
                                                     jnp.asarray(text), pad_id=0, vocab_size=10)
  args = jnp.asarray(patch_emb, jnp.float32), jnp.asarray(token_emb, jnp.float32)
  np.testing.assert_allclose(loss_fn(*args), total / count, rtol=1e-5)
  _, g_token = jax.grad(loss_fn, argnums=(0, 1))(*args)
  counted = valid & (text != 2)
  assert np.all(g_token[~counted] == 0) and np.all(np.abs(g_token[counted]).sum(-1) > 0)


def test_the_words_weight_decays_on_a_cosine_to_zero_and_stays_there():
  loss_cfg = losses.default_loss_config()
  loss_cfg.words_weight = 8.0
  terms = {"contrastive_loss": jnp.float32(2.0), "words_loss": jnp.float32(3.0)}
  # Constant without a decay, whatever the step.
  assert float(losses.words_weight(loss_cfg, jnp.int32(500))) == 8.0
  np.testing.assert_allclose(losses.total_loss(terms, loss_cfg, jnp.int32(500)), 2.0 + 8.0 * 3.0, rtol=1e-6)
  loss_cfg.words_decay_steps = 100
  steps = np.array([0, 25, 50, 100, 250])
  want = 8.0 * 0.5 * (1 + np.cos(np.pi * np.minimum(steps, 100) / 100))   # 8, 6.83, 4, 0, 0
  got = [float(losses.words_weight(loss_cfg, jnp.int32(t))) for t in steps]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(losses.total_loss(terms, loss_cfg, jnp.int32(50)), 2.0 + 4.0 * 3.0, rtol=1e-6)
  # Without a step (an evaluation's loss), the configured weight.
  np.testing.assert_allclose(losses.total_loss(terms, loss_cfg), 2.0 + 8.0 * 3.0, rtol=1e-6)


def test_the_scenes_nouns_are_the_words_that_name_objects():
  from sycoca_jax.data import scenes, tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.scenes_word_tokenizer()
  vocab = losses.words_vocab("nouns", tokenizer.vocab_size)
  assert losses.words_vocab("all", tokenizer.vocab_size) is None
  named = {tokenizer.words[i] for i in np.flatnonzero(vocab)}
  assert {"circle", "disc", "circles", "7", "7s", "object", "things"} <= named
  assert not named & {"red", "a", "left", "small", "two", "digit", "<eos>"}
  # Every kind is named by some noun in its captions, in the singular and the plural.
  for kind in scenes.KINDS:
    words = scenes.SHAPE_WORDS.get(kind, (kind,))
    assert all(w in named and (scenes.SHAPE_PLURALS.get(w, w + "s") in named) for w in words)
  # 'nouns_colours': those and every colour word, synonyms included, and nothing else.
  both = {tokenizer.words[i] for i in np.flatnonzero(losses.words_vocab("nouns_colours", tokenizer.vocab_size))}
  assert both - named == {w for words in scenes.COLOUR_WORDS.values() for w in words} >= {"red", "grey", "violet"}
  # Grouped (loss.words_softmax='groups'): the nouns, then the colour words, as rows whose union is the vocabulary.
  grouped = losses.words_vocab("nouns_colours", tokenizer.vocab_size, grouped=True)
  assert grouped.shape == (2, tokenizer.vocab_size) and grouped.sum(0).max() == 1
  np.testing.assert_array_equal(grouped[0], vocab)
  np.testing.assert_array_equal(grouped.max(0), losses.words_vocab("nouns_colours", tokenizer.vocab_size))


def test_sequence_log_likelihood_sums_real_tokens():
  v = 7
  text = jnp.array([[1, 5, 6, 2, 0, 0], [1, 2, 0, 0, 0, 0]])
  uniform = jnp.zeros((2, 5, v))
  total, count = losses.sequence_log_likelihood(uniform, text)
  np.testing.assert_allclose(total, [-3 * np.log(v), -np.log(v)], rtol=1e-6)
  np.testing.assert_array_equal(count, [3, 1])
  # A model certain of every next token scores ~0; padding positions are ignored whatever they predict.
  certain = jnp.where(jnp.arange(v) == text[:, 1:, None], 30.0, -30.0)
  assert np.all(np.asarray(losses.sequence_log_likelihood(certain, text)[0]) > -1e-6)


@pytest.mark.parametrize("norm_pix,kind", [(True, "mse"), (False, "mse"), (True, "l1")])
def test_mim_loss_matches_numpy_on_hidden_patches_only(norm_pix, kind):
  rng = np.random.RandomState(2)
  images = rng.rand(2, 8, 8, 3).astype(np.float32)
  pred = rng.randn(2, 4, 48).astype(np.float32)
  mask = np.array([[1, 0, 0, 1], [0, 1, 0, 0]], np.float32)
  target = images.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
  if norm_pix:
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  err = np.square(pred - target) if kind == "mse" else np.abs(pred - target)
  want = (err.mean(-1) * mask).sum() / mask.sum()
  t = losses.mim_targets(jnp.asarray(images), 4, norm_pix)
  got = losses.mim_loss(jnp.asarray(pred), t, jnp.asarray(mask), kind)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  pred[mask == 0] += 50.0  # visible patches do not count
  np.testing.assert_allclose(losses.mim_loss(jnp.asarray(pred), t, jnp.asarray(mask), kind), want, rtol=1e-5)


ABLATIONS = {
    # name: (loss weights, towers that must receive gradient, towers that must not)
    "clip": ((1, 0, 0), {"image_encoder", "text_encoder", "logit_scale"}, {"text_decoder", "image_decoder"}),
    "coca": ((1, 2, 0), {"image_encoder", "text_encoder", "text_decoder", "logit_scale"}, {"image_decoder"}),
    "sycoca": ((1, 2, 1), {"image_encoder", "text_encoder", "text_decoder", "image_decoder", "logit_scale"},
               set()),
    "mim_only": ((0, 0, 1), {"image_encoder", "text_encoder", "image_decoder"}, {"text_decoder", "logit_scale"}),
}


@pytest.mark.slow(reason="compiles the gradient of every ablation row")
@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_gradients_reach_exactly_the_used_towers(name):
  weights, used, unused = ABLATIONS[name]
  cfg = tiny_model_config()
  model = build_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  loss_cfg = losses.default_loss_config()
  loss_cfg.itc_weight, loss_cfg.ic_weight, loss_cfg.mim_weight = weights
  images, text = random_batch(cfg, b=4)
  # One compiled program, as training runs it (op by op the gradient costs half as much CPU again).
  grads, aux = jax.jit(jax.grad(losses.make_loss_fn(model, loss_cfg), has_aux=True))(
      params, {"image": images, "text": text}, jax.random.PRNGKey(0))
  for tower in used | unused:
    leaves = jax.tree_util.tree_leaves_with_path(grads[tower])
    assert all(np.all(np.isfinite(g)) for _, g in leaves)
    if tower in unused:
      assert all(not np.any(g) for _, g in leaves), f"{name}: {tower} got gradient"
    else:
      dead = [jax.tree_util.keystr(p) for p, g in leaves if not np.any(g)]
      if weights[0] == 0:
        # Without ITC, the CLS token, ln_final and the projections feed only the (stop-gradient) mask scores.
        dead = [d for d in dead if not any(k in d for k in ("cls_emb", "ln_final", "proj"))]
      assert not dead, f"{name}: no gradient reaches {dead}"
  expected_terms = {k for k, w in zip(("contrastive_loss", "caption_loss", "mim_loss"), weights) if w}
  assert expected_terms <= set(aux)
  np.testing.assert_allclose(
      aux["loss"], sum(w * aux[k] for k, w in zip(("contrastive_loss", "caption_loss", "mim_loss"), weights)
                       if w), rtol=1e-6)


def test_loss_compiles_once():
  cfg = tiny_model_config()
  model = build_model(cfg)
  params = random_params(model)
  inner = losses.make_loss_fn(model, losses.default_loss_config())
  traces = []

  def counted(params, batch, rng):
    traces.append(1)
    return inner(params, batch, rng)

  step = jax.jit(jax.value_and_grad(counted, has_aux=True))
  for seed in range(3):
    images, text = random_batch(cfg, b=4, seed=seed)
    (loss, _), _ = step(params, {"image": images, "text": text}, jax.random.PRNGKey(seed))
    assert np.isfinite(loss)
  assert len(traces) == 1


def test_uint8_pixels_normalised_on_the_device_equal_the_host_normalisation():
  """Batches hand over uint8 and are normalised inside the jitted program: the same numbers, every loss term
  (MIM targets included) the same as with the float32 batches the host used to normalise."""
  cfg = tiny_model_config()
  model = build_model(cfg)
  params = random_params(model)
  _, text = random_batch(cfg, b=4)
  images = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  # The host normalisation the pipeline used to run (float32 multiply, then add), and the textbook formula.
  host = np.add(np.multiply(images, pixels.SCALE, dtype=np.float32), pixels.OFFSET)
  textbook = (images / 255.0 - np.asarray(pixels.CLIP_MEAN)) / np.asarray(pixels.CLIP_STD)
  on_device = jax.jit(pixels.normalize)(images)
  assert on_device.dtype == jnp.float32
  np.testing.assert_allclose(on_device, host, rtol=0, atol=1e-6)
  np.testing.assert_allclose(on_device, textbook, rtol=0, atol=1e-5)
  assert pixels.normalize(host) is host  # normalised floats pass through: never normalised twice
  loss_fn = jax.jit(losses.make_loss_fn(model, losses.default_loss_config()))
  _, from_uint8 = loss_fn(params, {"image": images, "text": text}, jax.random.PRNGKey(0))
  _, from_host = loss_fn(params, {"image": jnp.asarray(host), "text": text}, jax.random.PRNGKey(0))
  assert {"contrastive_loss", "caption_loss", "mim_loss"} <= set(from_uint8)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), from_uint8, from_host)
