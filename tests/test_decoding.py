"""Greedy and beam search: hand-built models whose best caption is known, and the KV cache against recomputation."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax import decoding
from sycoca_jax.models.sycoca import SyCoCa, build_model
from sycoca_jax.tools.decode_benchmark import random_captioning_params as random_params
from tests.helpers import tiny_model_config

PAD, BOS, EOS = 0, 1, 2


# ------------------------------------------------------------------------------------------------ table models


def table_decoder(table: np.ndarray, batch: int) -> decoding.Decoder:
  """A fake model: logits of position i + 1 = table[b, i, h], h a hash of the whole prefix kept in the state.

  table [B, T, H, V]. Because h depends on every earlier token, a beam search that reorders its state wrongly
  reads the wrong row of the table.
  """
  table = jnp.asarray(table, jnp.float32)
  hashes = table.shape[2]

  def init(k):
    return {"h": jnp.zeros((batch * k,), jnp.int32), "example": jnp.repeat(jnp.arange(batch), k)}

  def step(state, tok, i):
    h = (state["h"] * 7 + tok[:, 0] + 1) % hashes
    return table[state["example"], i, h], {"h": h, "example": state["example"]}

  def gather(state, parent):
    return jax.tree.map(lambda x: decoding.gather_rows(x, parent), state)

  return decoding.Decoder(init, step, gather)


def brute_force(table: np.ndarray, max_len: int, min_len: int, alpha: float):
  """Best (tokens, log-prob) per example by enumerating every caption, scored as beam search scores them."""
  hashes, vocab = table.shape[2], table.shape[3]
  words = [w for w in range(vocab) if w not in (PAD, BOS, EOS)]
  results = []
  for b in range(table.shape[0]):
    best = (-np.inf, None, None)
    for n in range(max_len):  # n generated words before eos (or max_len - 1 words and no eos)
      for seq in itertools.product(words, repeat=n):
        ends_with_eos = n < max_len - 1
        if ends_with_eos and n < min_len:
          continue
        full = [BOS, *seq] + ([EOS] if ends_with_eos else [])
        h, logp = 0, 0.0
        for i in range(len(full) - 1):
          h = (h * 7 + full[i] + 1) % hashes
          logits = table[b, i, h]
          logp += logits[full[i + 1]] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        score = logp / ((5 + len(full) - 1) / 6) ** alpha
        if score > best[0]:
          best = (score, full + [PAD] * (max_len - len(full)), logp)
    results.append(best)
  return np.asarray([r[1] for r in results]), np.asarray([r[2] for r in results])


@functools.partial(jax.jit, static_argnames=("name", "batch", "max_len", "min_len", "kw"))
def _sample(table, name, batch, max_len, min_len=0, kw=()):
  return decoding.get_sampler(name)(table_decoder(table, batch), batch, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                                    max_len=max_len, min_len=min_len, **dict(kw))


def test_beam_finds_what_greedy_misses():
  # After bos: word 3 (p .55) or word 4 (p .45). After 3 every continuation is unlikely, after 4 eos is sure.
  p = np.full((1, 4, 8, 6), 1e-6)
  h_bos = (0 * 7 + BOS + 1) % 8
  p[0, 0, h_bos, [3, 4]] = [0.55, 0.45]
  p[0, 1, (h_bos * 7 + 3 + 1) % 8, [EOS, 3, 4, 5]] = [0.25, 0.25, 0.25, 0.25]
  p[0, 1, (h_bos * 7 + 4 + 1) % 8, EOS] = 0.95
  p[0, 2:] = 1.0 / 6
  table = np.log(p / p.sum(-1, keepdims=True))
  greedy = _sample(table, "greedy", 1, 4)
  beam = _sample(table, "beam", 1, 4, kw=(("beam_size", 2), ("alpha", 0.0)))
  assert greedy.tokens[0, 1] == 3
  np.testing.assert_array_equal(beam.tokens, [[BOS, 4, EOS, PAD]])
  np.testing.assert_allclose(beam.log_probs, [table[0, 0, h_bos, 4] + table[0, 1, 3, EOS]], rtol=1e-5)
  assert beam.log_probs[0] > greedy.log_probs[0]


@pytest.mark.parametrize("alpha,min_len", [(0.0, 0), (0.6, 0), (2.0, 1), (0.6, 3)])
def test_beam_with_enough_beams_is_exhaustive(alpha, min_len):
  """With K >= every step's candidates, beam search must return the exact optimum (length penalty and all)."""
  max_len, vocab = 5, 5  # words 3, 4 and eos: at most 2**3 = 8 live prefixes, so at most 24 candidates
  table = np.random.RandomState(int(10 * alpha) + min_len).randn(6, max_len, 16, vocab) * 2.0
  tokens, logp = brute_force(table, max_len, min_len, alpha)
  beam = _sample(table, "beam", 6, max_len, min_len, kw=(("beam_size", 24), ("alpha", alpha)))
  np.testing.assert_array_equal(beam.tokens, tokens)
  np.testing.assert_allclose(beam.log_probs, logp, rtol=1e-5, atol=1e-5)


def test_beam_of_one_is_greedy():
  table = np.random.RandomState(0).randn(16, 8, 32, 7) * 1.5
  greedy = _sample(table, "greedy", 16, 8)
  beam = _sample(table, "beam", 16, 8, kw=(("beam_size", 1), ("alpha", 0.0)))
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_allclose(beam.log_probs, greedy.log_probs, rtol=1e-6)
  assert (greedy.tokens == EOS).any(), "the table should make some captions end early"


@pytest.mark.parametrize("name", ["greedy", "beam"])
def test_eos_min_len_max_len(name):
  max_len = 7
  table = np.zeros((3, max_len, 16, 6), np.float32)
  table[..., PAD] = table[..., BOS] = 9.0  # the most likely tokens, but never generated
  table[0, :, :, EOS] = 5.0                # example 0: eos at once
  table[1, :, :, 3] = 5.0                  # example 1: word 3 forever, never eos
  table[1, :, :, EOS] = -30.0
  table[2, 2:, :, EOS] = 5.0               # example 2: eos from the third generated token on
  table[2, :2, :, 4] = 5.0
  table[2, :2, :, EOS] = -30.0
  kw = (("beam_size", 2),) if name == "beam" else ()
  out = _sample(table, name, 3, max_len, 0, kw)
  np.testing.assert_array_equal(out.tokens, [[BOS, EOS, 0, 0, 0, 0, 0],
                                             [BOS, 3, 3, 3, 3, 3, 3],
                                             [BOS, 4, 4, EOS, 0, 0, 0]])
  # The reported log-probability is the model's own, eos included and padding not.
  lsm = jax.nn.log_softmax(table, axis=-1)
  np.testing.assert_allclose(out.log_probs[0], lsm[0, 0, 0, EOS], rtol=1e-5)
  np.testing.assert_allclose(out.log_probs[1], 6 * lsm[1, 0, 0, 3], rtol=1e-5)

  out = _sample(table, name, 3, max_len, 2, kw)  # min_len=2: eos only after two words
  assert out.tokens[0, 3] == EOS and EOS not in out.tokens[0, :3] and (out.tokens[0, 4:] == PAD).all()
  np.testing.assert_array_equal(out.tokens[2], [BOS, 4, 4, EOS, 0, 0, 0])
  out = _sample(table, name, 3, max_len, max_len - 1, kw)  # min_len = max_len - 1: eos can never fit
  assert not (out.tokens == EOS).any() and not (out.tokens[:, 1:] == PAD).any()


def test_bad_lengths_are_refused():
  with pytest.raises(ValueError, match="min_len"):
    _sample(np.zeros((1, 4, 2, 5)), "greedy", 1, 4, 4)


# ------------------------------------------------------------------------------------------------ the real model


@functools.lru_cache(maxsize=None)
def _tiny():
  cfg = tiny_model_config(**{"vision.depth": 1, "text.depth": 1, "text_decoder.depth": 2})
  model = build_model(cfg)
  params = random_params(model)
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=SyCoCa.encode_image)["tokens"])
  return cfg, model, params, encode(params, images)


@functools.partial(jax.jit, static_argnames=("name", "cache", "beam_size"))
def _decode(params, image_tokens, eos, name, cache, beam_size=1):
  # eos is traced, so one compile serves every eos id.
  model = _tiny()[1]
  decoder = decoding.model_decoder(model, params, image_tokens, 10, cache=cache)
  kw = {"beam_size": beam_size, "alpha": 0.0} if name == "beam" else {}
  return decoding.get_sampler(name)(decoder, image_tokens.shape[0], bos_id=BOS, eos_id=eos, max_len=10, **kw)


@functools.partial(jax.jit, static_argnums=(0,))
def _teacher_forced_log_prob(model, params, image_tokens, tokens):
  logits = model.apply({"params": params}, image_tokens, tokens, method=SyCoCa.caption_logits)
  target = tokens[:, 1:]
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(target != PAD, lp, 0.0), axis=1)


@pytest.mark.slow(reason="compiles the decoder with and without its KV cache at every length")
def test_kv_cache_matches_recomputation():
  _, model, params, image_tokens = _tiny()
  first = _decode(params, image_tokens, EOS, "greedy", True)
  # An eos id the untrained model does produce, so that rows end at different steps.
  eos = int(first.tokens[0, 3])
  results = {}
  for name, beam_size in (("greedy", 1), ("beam", 3)):
    cached = _decode(params, image_tokens, eos, name, True, beam_size)
    plain = _decode(params, image_tokens, eos, name, False, beam_size)
    np.testing.assert_array_equal(cached.tokens, plain.tokens)
    np.testing.assert_allclose(cached.log_probs, plain.log_probs, rtol=1e-5, atol=1e-5)
    tokens = np.asarray(cached.tokens)
    ended = (tokens == eos).any(axis=1)
    assert ended.any() and ended[0], "the chosen eos must end some captions"
    for row in tokens[ended]:  # padding after eos
      assert (row[list(row).index(eos) + 1:] == PAD).all()
    teacher = _teacher_forced_log_prob(model, params, image_tokens, cached.tokens)
    np.testing.assert_allclose(cached.log_probs, teacher, rtol=1e-5, atol=1e-5)
    results[name] = cached
  one = _decode(params, image_tokens, eos, "beam", True, 1)
  np.testing.assert_array_equal(one.tokens, results["greedy"].tokens)


def test_build_captioner_end_to_end():
  cfg, model, params, image_tokens = _tiny()
  del image_tokens
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  caption = decoding.build_captioner(model, sampler="greedy", bos_id=BOS, eos_id=EOS, max_len=10)
  out = caption(params, images)
  assert out.tokens.shape == (4, 10) and out.tokens.dtype == jnp.int32 and out.log_probs.shape == (4,)
  np.testing.assert_array_equal(out.tokens, _decode(params, _tiny()[3], EOS, "greedy", True).tokens)
  with pytest.raises(ValueError, match="context_length"):
    decoding.build_captioner(model, sampler="greedy", bos_id=BOS, eos_id=EOS,
                             max_len=cfg.text.context_length + 1)(params, images)
  with pytest.raises(ValueError, match="Unknown sampler"):
    decoding.get_sampler("nucleus")
