"""The image decoder D_v: the TG-MIM head.

An MAE-style light decoder: the visible patches' encoder tokens plus a learned mask token for every hidden
patch, put back in image order (ids_restore), self-attention among patches, cross-attention to the caption's
token features (padding masked), and a linear head to each patch's pixels. With `cross_attention=False` it is
a plain MAE decoder (the paper's "image-only MIM" ablation). Shapes as in layers.py.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sycoca_jax.models import layers


class ImageDecoder(nn.Module):
  tower: layers.TowerConfig
  num_patches: int
  patch_pixels: int
  cross_attention: bool = True

  @nn.compact
  def __call__(self, visible: jax.Array, ids_restore: jax.Array, text_tokens: Optional[jax.Array] = None,
               text_valid: Optional[jax.Array] = None) -> jax.Array:
    """visible [B, K, D] encoder tokens of the kept patches (in ids_shuffle order), ids_restore [B, N],
    text_tokens [B, L, D_t], text_valid [B, L] -> predicted pixels [B, N, P] (float32)."""
    t = self.tower
    batch, kept, _ = visible.shape
    x = nn.Dense(t.width, dtype=t.dtype, name="embed")(visible.astype(t.dtype))
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (t.width,))
    x = jnp.concatenate(
        [x, jnp.broadcast_to(mask_token.astype(x.dtype), (batch, self.num_patches - kept, t.width))], axis=1)
    x = layers.take_tokens(x, ids_restore)  # back to image order
    pos = self.param("positional_embedding", nn.initializers.normal(0.02), (self.num_patches, t.width))
    x = x + pos.astype(x.dtype)

    kv, kv_lengths = None, None
    if self.cross_attention:
      # Captions are right-padded, so their length hides the padding keys (what flash attention takes).
      kv, kv_lengths = text_tokens.astype(t.dtype), layers.valid_lengths(text_valid)
    x = layers.Transformer(t, cross=self.cross_attention, name="transformer")(x, kv, kv_lengths=kv_lengths)
    x = t.layer_norm("ln_final")(x)
    # Float32 out of the matmul itself (not bf16 rounded, then widened): the pixels go straight into the loss.
    return nn.Dense(self.patch_pixels, dtype=t.dtype, dot_general=layers.dot_general_f32, name="pred")(x)
