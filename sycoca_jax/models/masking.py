"""Text-guided attentive masking: which patches the captioner (IC) and the image decoder (TG-MIM) see.

Shape legend: B batch, N patches, L text tokens, E joint embedding size, K kept patches.

The SyCoCa recipe (DESIGN.md 1.2):
  s_i = max over valid caption tokens j of cos(W_v p_i, W_t t_j)    (stop-gradient)
  IC keeps the ceil((1 - r_ic) N) highest-scoring patches (drops the least text-relevant r_ic);
  TG-MIM hides the floor(r_mim N) highest-scoring patches and rebuilds them from the rest plus the caption.
At r_ic = r_mim = 0.5 the IC patches are exactly the TG-MIM hidden ones: the two heads see complementary sets.

All shapes are static (k is a Python int), so a strategy compiles once and runs inside the train step. Every
operation is per example (argsort and gathers along the patch axis), so a batch-sharded input stays sharded.
Strategies are looked up by name: `attentive`, `random` (FLIP / MAE style, for ablations) and `none`; each
takes patch_embeddings [B, N, E], token_embeddings [B, L, E] and token_valid [B, L] (only `attentive` reads
their values) and returns a `Masks`.
"""

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from sycoca_jax.models.layers import normalize


@dataclasses.dataclass(frozen=True)
class Masks:
  """Index sets chosen for one batch (all int32).

  ic_keep     [B, K_ic]   patches the captioner attends to (None: all patches).
  mim_keep    [B, K_mim]  patches the TG-MIM encoder pass sees, in ids_shuffle order.
  mim_restore [B, N]      inverse permutation: un-shuffles [visible, mask tokens] back to image order.
  mim_mask    [B, N]      1.0 where TG-MIM must reconstruct (hidden patches), 0.0 where visible.
  scores      [B, N]      the ranking used (float32).
  """

  ic_keep: Optional[jax.Array]
  mim_keep: Optional[jax.Array]
  mim_restore: Optional[jax.Array]
  mim_mask: Optional[jax.Array]
  scores: jax.Array


jax.tree_util.register_dataclass(
    Masks, data_fields=["ic_keep", "mim_keep", "mim_restore", "mim_mask", "scores"], meta_fields=[])


def num_hidden(num_patches: int, ratio: float) -> int:
  """Patches a head drops at `ratio`: floor(ratio * N), a compile-time constant.

  The product is rounded up by 1e-6 before the floor: ratios are decimal fractions that binary floats hold only
  approximately (0.29 * 100 is 28.999999999999996), and a bare int() would drop one patch fewer than asked.
  """
  return math.floor(ratio * num_patches + 1e-6)


def patch_scores(patch_embeddings: jax.Array, token_embeddings: jax.Array, token_valid: jax.Array) -> jax.Array:
  """s_i = max_j cos(patch_i, token_j) over valid tokens j: [B, N, E], [B, L, E], [B, L] -> [B, N] float32.

  Invalid tokens (padding, start token) are excluded from the max; a caption with no valid token gives -1.
  """
  p = normalize(patch_embeddings)
  t = normalize(token_embeddings)
  sim = jnp.einsum("bne,ble->bnl", p, t)
  sim = jnp.where(token_valid[:, None, :], sim, -jnp.inf)
  return jax.lax.stop_gradient(jnp.maximum(sim.max(axis=-1), -1.0))


def word_scores(patch_embeddings: jax.Array, word_vectors: jax.Array, token_valid: jax.Array) -> jax.Array:
  """s_i = sum over valid caption tokens j of <W_v p_i, w_j>: [B, N, E], [B, L, E], [B, L] -> [B, N] float32.

  w_j is the caption-words head's weight vector for token j's word (masking.score="words"). With mean-pooled
  patches the head's image logit for a word is the mean of the patches' logits, so s_i is patch i's part of the
  image's evidence for the caption's words (a class activation map of the caption).
  """
  sim = jnp.einsum("bne,ble->bn", patch_embeddings.astype(jnp.float32),
                   word_vectors.astype(jnp.float32) * token_valid[..., None])
  return jax.lax.stop_gradient(sim)


def noun_scores(patch_embeddings: jax.Array, kernel: jax.Array, bias: jax.Array, text: jax.Array,
                noun_ids: jax.Array, token_valid: jax.Array) -> jax.Array:
  """s_i = sum over the caption's valid noun tokens j of log p(word_j | patch i): [B, N, E] -> [B, N] float32.

  p(. | patch i) is the caption-words head's softmax over the nouns alone (noun_ids [K], into the vocabulary;
  kernel [E, V], bias [V]) read on patch i's embedding (masking.score="nouns"). A direction shared by every word
  vector cancels in it, and the caption's other words add nothing: what is left is how much patch i names this
  caption's nouns rather than others.
  """
  logits = patch_embeddings.astype(jnp.float32) @ kernel[:, noun_ids].astype(jnp.float32) + bias[noun_ids]
  log_p = jax.nn.log_softmax(logits, axis=-1)                                     # [B, N, K]
  # Each noun's count among the caption's valid tokens [B, K]: s = log_p @ counts.
  counts = ((text[..., None] == noun_ids) & token_valid[..., None]).sum(axis=1).astype(jnp.float32)
  return jax.lax.stop_gradient(jnp.einsum("bnk,bk->bn", log_p, counts))


def masks_from_scores(scores: jax.Array, ic_ratio: float, mim_ratio: float) -> Masks:
  """Ranks patches by score (descending) and cuts the IC and TG-MIM sets out of the one ordering."""
  num_patches = scores.shape[1]
  # Stable sort of -scores: ties keep image order, so results are reproducible across backends.
  order = jnp.argsort(-scores, axis=1, stable=True).astype(jnp.int32)  # most text-relevant first
  ic_keep = order[:, : num_patches - num_hidden(num_patches, ic_ratio)] if ic_ratio > 0 else None

  mim_keep = mim_restore = mim_mask = None
  hidden = num_hidden(num_patches, mim_ratio)
  if hidden > 0:
    shuffle = order[:, ::-1]  # least relevant first: the first N - hidden stay visible
    mim_keep = shuffle[:, : num_patches - hidden]
    mim_restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
    mim_mask = (mim_restore >= num_patches - hidden).astype(jnp.float32)
  return Masks(ic_keep, mim_keep, mim_restore, mim_mask, scores.astype(jnp.float32))


def attentive_masks(rng, *, patch_embeddings, token_embeddings, token_valid, ic_ratio, mim_ratio) -> Masks:
  del rng
  return masks_from_scores(patch_scores(patch_embeddings, token_embeddings, token_valid), ic_ratio, mim_ratio)


def random_masks(rng, *, patch_embeddings, token_embeddings, token_valid, ic_ratio, mim_ratio) -> Masks:
  del token_embeddings, token_valid
  return masks_from_scores(jax.random.uniform(rng, patch_embeddings.shape[:2]), ic_ratio, mim_ratio)


def no_masks(rng, *, patch_embeddings, token_embeddings, token_valid, ic_ratio, mim_ratio) -> Masks:
  del rng, token_embeddings, token_valid
  if ic_ratio > 0 or mim_ratio > 0:
    raise ValueError("masking.strategy='none' needs masking.ic_ratio = masking.mim_ratio = 0.")
  return masks_from_scores(jnp.zeros(patch_embeddings.shape[:2]), 0.0, 0.0)


STRATEGIES: dict[str, Callable[..., Masks]] = {"attentive": attentive_masks, "random": random_masks, "none": no_masks}


def get_strategy(name: str) -> Callable[..., Masks]:
  if name not in STRATEGIES:
    raise ValueError(f"masking.strategy: unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}.")
  return STRATEGIES[name]
