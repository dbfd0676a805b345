"""Autoregressive caption sampling: greedy and beam search, with a KV cache, under jit.

Shape legend: B batch (images), K beams, R = B * K decoder rows, T the output length (bos included), V
vocabulary, N image tokens, D width.

A sampler sees the model only through a `Decoder`, three pure functions over a row-batched state:

  init(k)             -> state for R = B * k rows, each example repeated k times in a row (b0 b0 .. b1 b1 ..)
  step(state, tok, i) -> (logits [R, V] for position i + 1, new state); tok [R, 1] is the token at position i
  gather(state, parent) -> the state after beam search's reshuffle: parent int [B, k], row b * k + j takes
                         the state of row b * k + parent[b, j] (rows move only within their example)

`model_decoder(model, params, image_tokens, max_len, cache=True)` is the SyCoCa one: the state is the 'cache'
collection of the text towers (self-attention keys/values filled one position per step, the cross-attention
keys/values of the image tokens projected once). With cache=False it is the reference path: the state is the
token matrix [R, T] and every step recomputes the whole prefix with `caption_logits` (T times the work; used
by the tests, and by tools/decode_benchmark to measure what the cache buys).

Conventions, shared by every sampler:
  - Output rows are laid out as the tokenizers encode them: bos, generated ids, eos, then pad_id. T = max_len.
  - `min_len`: eos is forbidden until at least min_len tokens (bos and eos not counted) have been generated.
  - A row that generates no eos stops at max_len; it counts as finished (truncated), not as a failure.
  - pad_id and bos_id are never generated (the cached and uncached paths would then disagree: the text
    encoder masks padding keys when it sees a whole row, the cache does not).
  - Log-probabilities are the model's own: sum over the generated tokens (eos included, pad excluded) of
    log_softmax(logits)[token], before the eos / pad / bos constraints. They are what teacher forcing the
    output row through `caption_logits` gives, so `score` in sycoca_jax.inference agrees with them.
  - Beam search ranks finished hypotheses by log_prob / lp(len), GNMT's length penalty (Wu et al. 2016):
    lp(len) = ((5 + len) / 6) ** alpha, len = generated tokens including eos. alpha = 0 ranks by the raw sum
    (which favours short captions); larger alpha favours longer ones. Default 0.6, as GNMT and T5X.

Samplers are registered by name ("greedy", "beam") so configs stay declarative:
    decoded = get_sampler(name)(decoder, batch_size, bos_id=..., eos_id=..., max_len=..., **sampler_kw)
`build_captioner(model, ...)` wraps image encoding + sampling into one jitted function of (params, images).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp

# A large finite negative rather than -inf: sums and differences of it stay finite (no NaN from -inf - -inf).
NEG_INF = -1.0e9


class Decoded(NamedTuple):
  tokens: jax.Array     # int32 [B, T]: bos, ids, eos, pad ...
  log_probs: jax.Array  # float32 [B]: sum of the generated tokens' log-probabilities (eos included)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """What a sampler needs from a model; see the module docstring."""

  init: Callable[[int], Any]
  step: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
  gather: Callable[[Any, jax.Array], Any]


def gather_rows(x: jax.Array, parent: jax.Array, axis: int = 0) -> jax.Array:
  """x [..., R, ...] (R = B * k on `axis`) -> row b * k + j replaced by row b * k + parent[b, j].

  Split R into [B, k] and gather along k with B a batch dimension of the gather: a batch-sharded state stays
  sharded (a flat gather by global row ids would make every device fetch rows from the others).
  """
  b, k = parent.shape
  axis = axis % x.ndim
  x = x.reshape(x.shape[:axis] + (b, k) + x.shape[axis + 1:])
  index = parent.reshape((1,) * axis + (b, k) + (1,) * (x.ndim - axis - 2))
  x = jnp.take_along_axis(x, index, axis=axis + 1, mode="clip")
  return x.reshape(x.shape[:axis] + (b * k,) + x.shape[axis + 2:])


# ------------------------------------------------------------------------------------------------------------------
# The SyCoCa decoder.
# ------------------------------------------------------------------------------------------------------------------


def _gather_cache(cache: Any, parent: jax.Array) -> Any:
  """Reorders the rows of a flax 'cache' collection.

  Key / value caches are [..., R, S, H, d] (a leading layer axis when the layers are scanned), so the row axis
  is the fourth from last; cache_index is shared by all rows (every row is at the same position).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(cache))
  out = {}
  for path, x in flat.items():
    out[path] = x if path[-1] == "cache_index" else gather_rows(x, parent, axis=x.ndim - 4)
  return flax.traverse_util.unflatten_dict(out)


def model_decoder(model, params, image_tokens: jax.Array, max_len: int, *, cache: bool = True) -> Decoder:
  """The Decoder of a SyCoCa `model` for image_tokens [B, N, D] (encode_image(...)['tokens']).

  max_len is T, the output length with bos; it may not exceed the text tower's context_length.
  """
  from sycoca_jax.models.sycoca import SyCoCa  # pylint: disable=g-import-not-at-top

  context = model.text_encoder.context_length
  if max_len > context:
    raise ValueError(f"max_len={max_len} exceeds the text encoder's context_length={context}; lower the "
                     "sampler's max_len.")
  variables = {"params": params}

  def rows_of(k):
    return jnp.repeat(image_tokens, k, axis=0) if k > 1 else image_tokens

  if not cache:
    def init(k):
      return {"image_tokens": rows_of(k),
              "text": jnp.zeros((image_tokens.shape[0] * k, max_len), jnp.int32)}

    def step(state, tok, i):
      text = jax.lax.dynamic_update_slice(state["text"], tok.astype(jnp.int32), (0, i))
      # Causal towers: the logits at position i only read tokens 0 .. i, whatever fills the rest of the row.
      logits = model.apply(variables, state["image_tokens"], text, method=SyCoCa.caption_logits)
      logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
      return logits, {"image_tokens": state["image_tokens"], "text": text}

    def gather(state, parent):
      return jax.tree.map(lambda x: gather_rows(x, parent), state)

    return Decoder(init, step, gather)

  def init(k):
    images = rows_of(k)
    # The first decode=True call creates the cache at its full length (and projects the image keys / values);
    # its logits are discarded and cache_index stays 0.
    dummy = jnp.zeros((images.shape[0], max_len), jnp.int32)
    _, state = model.apply(variables, images, dummy, 0, method=SyCoCa.decode_step, mutable=["cache"])
    return {"image_tokens": images, "cache": state["cache"]}

  def step(state, tok, i):
    logits, new = model.apply({**variables, "cache": state["cache"]}, state["image_tokens"], tok, i,
                              method=SyCoCa.decode_step, mutable=["cache"])
    return logits[:, 0], {"image_tokens": state["image_tokens"], "cache": new["cache"]}

  def gather(state, parent):
    # The image tokens are only read on the call that created the cache; they need no reordering.
    return {"image_tokens": state["image_tokens"], "cache": _gather_cache(state["cache"], parent)}

  return Decoder(init, step, gather)


# ------------------------------------------------------------------------------------------------------------------
# Samplers.
# ------------------------------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., Decoded]] = {}


def register_sampler(name: str):
  def wrap(fn):
    SAMPLERS[name] = fn
    return fn
  return wrap


def get_sampler(name: str) -> Callable[..., Decoded]:
  if name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {name!r}; registered: {sorted(SAMPLERS)}")
  return SAMPLERS[name]


def _check_lengths(max_len: int, min_len: int) -> None:
  if max_len < 2:
    raise ValueError(f"max_len={max_len}: a caption row needs room for bos and at least one token.")
  if not 0 <= min_len <= max_len - 1:
    raise ValueError(f"min_len={min_len} must be in [0, max_len - 1 = {max_len - 1}].")


def _constrained(log_probs: jax.Array, i: jax.Array, *, bos_id, eos_id, pad_id, min_len) -> jax.Array:
  """log_probs [R, V] of the token at position i + 1 with the forbidden tokens pushed to NEG_INF."""
  forbid = jnp.zeros(log_probs.shape[-1], bool).at[pad_id].set(True).at[bos_id].set(True)
  # Position i + 1 holds the (i + 1)-th generated token, so eos there ends a caption of i tokens.
  forbid = forbid.at[eos_id].set(i < min_len)
  return jnp.where(forbid, NEG_INF, log_probs)


@register_sampler("greedy")
def greedy(decoder: Decoder, batch_size: int, *, bos_id: int, eos_id: int, max_len: int, pad_id: int = 0,
           min_len: int = 0) -> Decoded:
  """The most likely next token at every step; a row stops at its eos (then pad) or at max_len."""
  _check_lengths(max_len, min_len)
  tokens = jnp.full((batch_size, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)

  def cond(carry):
    i, _, _, finished, _ = carry
    return (i < max_len - 1) & ~jnp.all(finished)

  def body(carry):
    i, tokens, state, finished, total = carry
    logits, state = decoder.step(state, jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1), i)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    nxt = jnp.argmax(_constrained(log_probs, i, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, min_len=min_len),
                     axis=-1).astype(jnp.int32)
    chosen = jnp.take_along_axis(log_probs, nxt[:, None], axis=-1)[:, 0]
    total = total + jnp.where(finished, 0.0, chosen)
    nxt = jnp.where(finished, pad_id, nxt)
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i + 1))
    return i + 1, tokens, state, finished | (nxt == eos_id), total

  carry = (jnp.array(0, jnp.int32), tokens, decoder.init(1), jnp.zeros(batch_size, bool),
           jnp.zeros(batch_size, jnp.float32))
  _, tokens, _, _, total = jax.lax.while_loop(cond, body, carry)
  return Decoded(tokens, total)


def gnmt_length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """((5 + length) / 6) ** alpha; a hypothesis' score is its log-probability divided by this."""
  return ((5.0 + length) / 6.0) ** alpha


@register_sampler("beam")
def beam_search(decoder: Decoder, batch_size: int, *, bos_id: int, eos_id: int, max_len: int, pad_id: int = 0,
                min_len: int = 0, beam_size: int = 4, alpha: float = 0.6) -> Decoded:
  """Beam search keeping `beam_size` live hypotheses per image; returns the best-scoring finished one.

  Each step extends every live hypothesis by every token and ranks the extensions by log-probability. Among
  the K best, those ending in eos (or reaching max_len) are offered to the K-best finished pool with their
  length-penalised score; the K best extensions that do not end stay live (taken from the 2K best: with at
  most K eos among them there are always K). A finished hypothesis stays finished. As in fairseq and
  Hugging Face, an eos ranked below the K best is not a finished hypothesis: that keeps beam_size=1 exactly
  greedy (with alpha=0). The loop stops early once no live hypothesis can still beat the worst finished one
  of its image: with alpha >= 0 the best a live one can reach is log_prob / lp(max length).
  """
  _check_lengths(max_len, min_len)
  if beam_size < 1:
    raise ValueError(f"beam_size={beam_size} must be >= 1.")
  if alpha < 0:
    raise ValueError(f"alpha={alpha}: the early stop needs a length penalty exponent >= 0.")
  b, k, t = batch_size, beam_size, max_len
  max_generated = t - 1
  best_possible_lp = gnmt_length_penalty(jnp.float32(max_generated), alpha)

  seqs = jnp.full((b, k, t), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
  # Only beam 0 is live at the start: the others are copies of it and must not be extended a second time.
  alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  finished_seqs = seqs
  finished_logp = jnp.zeros((b, k), jnp.float32)
  finished_score = jnp.full((b, k), NEG_INF, jnp.float32)

  def cond(carry):
    i, _, alive_logp, _, _, _, finished_score = carry
    best_alive = jnp.max(alive_logp, axis=1) / best_possible_lp
    done = jnp.all(jnp.min(finished_score, axis=1) >= best_alive)
    return (i < max_generated) & ~done

  def body(carry):
    i, seqs, alive_logp, state, finished_seqs, finished_logp, finished_score = carry
    tok = jax.lax.dynamic_slice_in_dim(seqs.reshape(b * k, t), i, 1, axis=1)
    logits, state = decoder.step(state, tok, i)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    log_probs = _constrained(log_probs, i, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, min_len=min_len)
    vocab = log_probs.shape[-1]
    cand = (alive_logp[:, :, None] + log_probs.reshape(b, k, vocab)).reshape(b, k * vocab)
    cand_logp, flat = jax.lax.top_k(cand, 2 * k)                     # [B, 2K]
    beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(seqs, beam[:, :, None], axis=1)   # [B, 2K, T]
    cand_seqs = jax.lax.dynamic_update_slice(cand_seqs, token[:, :, None], (0, 0, i + 1))
    ends = (token == eos_id) | (i + 1 == max_generated)
    finishes = ends & (jnp.arange(2 * k) < k)[None, :]                # ranked among the K best

    # Finished pool: the K best of the old pool and the top-K candidates that just ended.
    new_score = jnp.where(finishes, cand_logp / gnmt_length_penalty((i + 1).astype(jnp.float32), alpha), NEG_INF)
    pool_score = jnp.concatenate([finished_score, new_score], axis=1)
    pool_score, top = jax.lax.top_k(pool_score, k)
    finished_seqs = jnp.take_along_axis(jnp.concatenate([finished_seqs, cand_seqs], 1), top[:, :, None], 1)
    finished_logp = jnp.take_along_axis(jnp.concatenate([finished_logp, cand_logp], 1), top, 1)

    # Live beams: the K best candidates that did not end. The state follows its hypotheses.
    alive_logp, top = jax.lax.top_k(jnp.where(ends, NEG_INF, cand_logp), k)
    seqs = jnp.take_along_axis(cand_seqs, top[:, :, None], axis=1)
    parent = jnp.take_along_axis(beam, top, axis=1)                  # [B, K] beam index within the image
    state = decoder.gather(state, parent)
    return i + 1, seqs, alive_logp, state, finished_seqs, finished_logp, pool_score

  carry = (jnp.array(0, jnp.int32), seqs, alive_logp, decoder.init(k), finished_seqs, finished_logp,
           finished_score)
  _, _, _, _, finished_seqs, finished_logp, _ = jax.lax.while_loop(cond, body, carry)
  # top_k sorts: slot 0 of the pool is the best finished hypothesis.
  return Decoded(finished_seqs[:, 0], finished_logp[:, 0])


# ------------------------------------------------------------------------------------------------------------------
# Images -> captions, jitted.
# ------------------------------------------------------------------------------------------------------------------


def _sampler(model, sampler, bos_id, eos_id, max_len, pad_id, sampler_kw):
  max_len = max_len or model.text_encoder.context_length
  pad_id = model.pad_id if pad_id is None else pad_id
  sample = functools.partial(get_sampler(sampler), bos_id=bos_id, eos_id=eos_id, max_len=max_len, pad_id=pad_id,
                             **sampler_kw)
  return sample, max_len


def build_captioner(model, *, sampler: str = "beam", bos_id: int, eos_id: int, max_len: int | None = None,
                    pad_id: int | None = None, cache: bool = True, **sampler_kw) -> Callable[..., Decoded]:
  """A jitted fn(params, images [B, S, S, 3]) -> Decoded: encode every patch, then sample.

  The captioner sees all patches at inference (attentive masking is a training-time choice). max_len defaults
  to the text tower's context_length; sampler_kw go to the sampler (min_len, beam_size, alpha). Under a mesh,
  pass images sharded over the batch axis: rows never mix, so the batch stays sharded through the loop.
  """
  from sycoca_jax.models.sycoca import SyCoCa  # pylint: disable=g-import-not-at-top

  sample, max_len = _sampler(model, sampler, bos_id, eos_id, max_len, pad_id, sampler_kw)

  @jax.jit
  def caption(params, images):
    image_tokens = model.apply({"params": params}, images, method=SyCoCa.encode_image)["tokens"]
    return sample(model_decoder(model, params, image_tokens, max_len, cache=cache), images.shape[0])

  return caption


def build_token_decoder(model, *, sampler: str = "beam", bos_id: int, eos_id: int, max_len: int | None = None,
                        pad_id: int | None = None, cache: bool = True, **sampler_kw) -> Callable[..., Decoded]:
  """As build_captioner, from image tokens: a jitted fn(params, image_tokens [B, N, D]) -> Decoded."""
  sample, max_len = _sampler(model, sampler, bos_id, eos_id, max_len, pad_id, sampler_kw)

  @jax.jit
  def decode(params, image_tokens):
    return sample(model_decoder(model, params, image_tokens, max_len, cache=cache), image_tokens.shape[0])

  return decode
