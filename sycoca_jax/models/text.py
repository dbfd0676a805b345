"""The text towers: the unimodal text encoder E_t and the multimodal text decoder D_t (the IC head).

Shapes as in layers.py. Both towers are causal, so a caption's token i only ever depends on tokens <= i:
that is what lets D_t be trained with teacher forcing and sampled one token at a time with a KV cache.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sycoca_jax.models import layers


class TextEncoder(nn.Module):
  """Causal transformer over caption tokens with a learned CLS token appended at the end (CoCa's unimodal part).

  Initialised as open_clip's TextTransformer: embeddings N(0, 0.02), positions and CLS N(0, 0.01), blocks with
  depth-scaled residual outputs (layers.InitStds.open_clip), text_projection N(0, width ** -0.5).

  The CLS token sees the whole caption; padding keys are masked. `legacy_cls_mask=True` reproduces the mask of
  open_clip's released CoCa weights, which is shifted by one position (open_clip's `correct_cls_mask=False`):
  key j is hidden iff token j - 1 is padding, and key 0 always visible. Use it only for imported weights.
  """

  tower: layers.TowerConfig
  vocab_size: int
  context_length: int
  embed_dim: int
  pad_id: int = 0
  legacy_cls_mask: bool = False

  def setup(self):
    t = self.tower
    self.token_embedding = nn.Embed(self.vocab_size, t.width, embedding_init=nn.initializers.normal(0.02))
    self.cls_emb = self.param("cls_emb", nn.initializers.normal(0.01), (t.width,))
    self.positional_embedding = self.param(
        "positional_embedding", nn.initializers.normal(0.01), (self.context_length + 1, t.width))
    self.transformer = layers.Transformer(t, init_stds=layers.InitStds.open_clip(t.width, t.depth))
    self.ln_final = t.layer_norm()
    self.text_projection = self.param(
        "text_projection", nn.initializers.normal(t.width ** -0.5), (t.width, self.embed_dim))

  def __call__(self, text: jax.Array) -> dict[str, jax.Array]:
    """text [B, L] token ids -> pooled [B, E] (CLS, unnormalised, float32), tokens [B, L, D], token_embeddings
    [B, L, E].

    `tokens` are the raw last-layer features that D_t continues from (open_clip applies no norm to them);
    `token_embeddings` are ln_final + text_projection applied per token: the joint space that attentive
    masking compares patches with.
    """
    batch, length = text.shape
    x = self.token_embedding(text).astype(self.tower.dtype)
    x = jnp.concatenate([x, jnp.broadcast_to(self.cls_emb.astype(x.dtype), (batch, 1, self.tower.width))], axis=1)
    x = x + self.positional_embedding[: length + 1].astype(x.dtype)

    valid = text != self.pad_id
    if self.tower.attention_impl == "xla":
      # Causal, and padding keys hidden by a [B, 1, 1, L + 1] mask: exact for any padding. (XLA forms the full
      # mask inside the kernel either way.)
      cls_valid = jnp.ones((batch, 1), bool)
      keys = jnp.concatenate([cls_valid, valid] if self.legacy_cls_mask else [valid, cls_valid], axis=1)
      x = self.transformer(x, mask=layers.key_padding_mask(keys), causal=True)
    else:
      x = self._transformer_by_lengths(x, valid)

    proj = self.text_projection.astype(x.dtype)
    tokens = x[:, :-1]
    return {
        "pooled": layers.matmul_f32(self.ln_final(x[:, -1]), proj),  # float32: the contrastive logits' input
        "tokens": tokens,
        "token_embeddings": self.ln_final(tokens) @ proj,
    }

  def _transformer_by_lengths(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    """The same attention as the masked path, given to the kernel as a causal flag and key lengths only.

    Flash attention takes those without a bias; cuDNN also refuses a bias in training when a sequence length is
    odd, as L + 1 = 77 is. Captions are right-padded: tokens 0 .. n - 1 are the caption, n .. L - 1 padding.
      legacy_cls_mask: keys 0 .. n are visible (the first pad included), the CLS key only in a full row: that is
        causal with n + 1 keys, exactly.
      otherwise: the CLS (last) must see the caption and itself, across the padding. Attention is order-free
        but for the mask (positions were added already), so the CLS is moved right after the caption (slot n),
        attends causally to n + 1 keys, and is moved back. Padding rows then also see the CLS; nothing reads
        their features (the decoder is causal, TG-MIM and masking skip padding).
    """
    length = valid.shape[1]
    n = layers.valid_lengths(valid)[:, None]  # [B, 1]
    if self.legacy_cls_mask:
      return self.transformer(x, causal=True, lengths=n[:, 0] + 1)
    slot = jnp.arange(length + 1)[None]
    to_slots = jnp.where(slot < n, slot, jnp.where(slot == n, length, slot - 1))   # slot s holds position ..
    from_slots = jnp.where(slot < n, slot, jnp.where(slot == length, n, slot + 1))  # position p is in slot ..
    x = self.transformer(layers.take_tokens(x, to_slots), causal=True, lengths=n[:, 0] + 1)
    return layers.take_tokens(x, from_slots)

  def encode_tokens(self, text: jax.Array, *, decode: bool = False, start: Any = 0) -> jax.Array:
    """Token features [B, l, D] without the CLS token: what the captioner needs while sampling.

    With decode=True, `text` holds the tokens at positions start .. start + l - 1 and the self-attention
    caches hold the earlier ones. Sampling never puts padding inside a prefix, so no padding mask is needed.
    """
    length = text.shape[1]
    x = self.token_embedding(text).astype(self.tower.dtype)
    x = x + jax.lax.dynamic_slice_in_dim(self.positional_embedding, start, length).astype(x.dtype)
    return self.transformer(x, causal=True, decode=decode)


class TextDecoder(nn.Module):
  """Multimodal decoder: causal self-attention over text features, cross-attention to image tokens, vocab logits.

  Each layer is a self-attention block then a cross-attention block, as open_clip's MultimodalTransformer, and
  initialised as it: both kinds of block with layers.InitStds.open_clip(width, depth), text_projection
  N(0, width ** -0.5).
  """

  tower: layers.TowerConfig
  vocab_size: int

  @nn.compact
  def __call__(self, text_tokens: jax.Array, image_tokens: jax.Array, *, decode: bool = False,
               return_features: bool = False) -> jax.Array:
    """text_tokens [B, L, D], image_tokens [B, S, D'] -> logits [B, L, V] (float32).

    return_features=True returns the final normalised features [B, L, D] instead (VQA / pooling heads).
    """
    # Every image token is a real one (the IC set has a fixed size): cross-attention needs no mask.
    t = self.tower
    x = layers.Transformer(t, cross=True, init_stds=layers.InitStds.open_clip(t.width, t.depth), name="transformer")(
        text_tokens.astype(t.dtype), image_tokens.astype(t.dtype), causal=True, decode=decode)
    x = t.layer_norm("ln_final")(x)
    if return_features:
      return x
    proj = self.param("text_projection", nn.initializers.normal(t.width ** -0.5), (t.width, self.vocab_size))
    return layers.matmul_f32(x, proj)
