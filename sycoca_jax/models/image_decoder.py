"""The image decoder D_v: the TG-MIM head.

An MAE-style light decoder: the visible patches' encoder tokens plus a learned mask token for every hidden
patch, put back in image order (ids_restore), self-attention among patches, cross-attention to the caption's
token features (padding masked), and a linear head to each patch's pixels. With `cross_attention=False` it is
a plain MAE decoder (the paper's "image-only MIM" ablation). Shapes as in layers.py.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sycoca_jax.models import layers

Dtype = Any


class ImageDecoder(nn.Module):
  num_patches: int
  patch_pixels: int
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  act: str = "gelu"
  norm_eps: float = 1e-5
  cross_attention: bool = True
  remat: bool = False
  scan: bool = False
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, visible: jax.Array, ids_restore: jax.Array, text_tokens: Optional[jax.Array] = None,
               text_valid: Optional[jax.Array] = None) -> jax.Array:
    """visible [B, K, D] encoder tokens of the kept patches (in ids_shuffle order), ids_restore [B, N],
    text_tokens [B, L, D_t], text_valid [B, L] -> predicted pixels [B, N, P] (float32)."""
    batch, kept, _ = visible.shape
    x = nn.Dense(self.width, dtype=self.dtype, name="embed")(visible.astype(self.dtype))
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (self.width,))
    x = jnp.concatenate(
        [x, jnp.broadcast_to(mask_token.astype(x.dtype), (batch, self.num_patches - kept, self.width))], axis=1)
    x = layers.take_tokens(x, ids_restore)  # back to image order
    pos = self.param("positional_embedding", nn.initializers.normal(0.02), (self.num_patches, self.width))
    x = x + pos.astype(x.dtype)

    kv, kv_lengths = None, None
    if self.cross_attention:
      # Captions are right-padded, so their length hides the padding keys (what flash attention takes).
      kv, kv_lengths = text_tokens.astype(self.dtype), layers.valid_lengths(text_valid)
    x = layers.Transformer(
        self.depth, self.num_heads, self.mlp_ratio, self.act, self.norm_eps, cross=self.cross_attention,
        remat=self.remat, scan=self.scan, attention_impl=self.attention_impl, dtype=self.dtype,
        name="transformer")(x, kv, kv_lengths=kv_lengths)
    x = nn.LayerNorm(self.norm_eps, dtype=self.dtype, name="ln_final")(x)
    # Float32 out of the matmul itself (not bf16 rounded, then widened): the pixels go straight into the loss.
    return nn.Dense(self.patch_pixels, dtype=self.dtype, dot_general=layers.dot_general_f32, name="pred")(x)
