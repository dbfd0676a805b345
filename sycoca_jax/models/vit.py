"""The image encoder E_v: a pre-LN ViT that can encode any gathered subset of its patches.

Shapes as in layers.py, and p the patch side, C channels. Positions are added before the gather and the CLS
token is always kept, so encoding `ids_keep` is exactly "the same ViT, looking only at those patches" (MAE /
FLIP style).

The stem (`model.vision.stem`) turns each patch into a token. Every stem here is patch-local: a token is a
function of its own patch's pixels only, so the TG-MIM pass, which encodes the visible patches alone, can never
see a hidden pixel (tests/test_model.py changes the hidden pixels and checks the visible tokens bit for bit).
  linear     a linear map of the flattened patch (open_clip's strided conv1; the paper's ViT).
  patch_cnn  a small CNN run on each patch as its own image: 3x3 convolutions zero-padded at the patch border,
             two 2x2 max-pools and a max over the patch, then a linear map to the width. It brings the locality
             and translation invariance a linear embedding lacks; it normalises with a LayerNorm over each
             pixel's channels (batch statistics would mix hidden and visible patches).
"""

from typing import Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from sycoca_jax.models import layers


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, P], patches in row-major order, pixels (p1, p2, c) within a patch."""
  return einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(patches: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
  """Inverse of `patchify` for square grids: [B, N, P] -> [B, H, W, C]."""
  grid = int(round(patches.shape[1] ** 0.5))
  return einops.rearrange(patches, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c", h=grid, w=grid, p1=patch_size,
                          p2=patch_size, c=channels)


STEMS = ("linear", "patch_cnn")


class PatchCNN(nn.Module):
  """The `patch_cnn` stem: patches [B, K, p, p, C] -> tokens [B, K, D], each patch encoded on its own."""

  width: int
  channels: Sequence[int] = (32, 32, 64, 64, 128)
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    b, k = patches.shape[:2]
    # Patches as a batch of small images: SAME padding pads with zeros at each patch's own border, never with a
    # neighbour's pixels.
    x = patches.reshape(b * k, *patches.shape[2:])
    for i, channels in enumerate(self.channels):
      x = nn.Conv(channels, (3, 3), dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.relu(nn.LayerNorm(self.norm_eps, dtype=self.dtype, name=f"norm{i}")(x))
      if i in (1, 3):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.max(axis=(1, 2))  # where in the patch a feature fires does not matter; the position embedding says where
    return nn.Dense(self.width, dtype=self.dtype, name="proj")(x).reshape(b, k, self.width)


class AttentionalPooler(nn.Module):
  """n learned queries cross-attending to the encoder's tokens (open_clip's CoCa pooler): [B, S, D] -> [B, Q, E]."""

  tower: layers.TowerConfig  # the encoder's: norms and attention kernel as its blocks'
  num_queries: int
  out_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    t = self.tower
    query = self.param("query", nn.initializers.normal(1.0), (self.num_queries, self.out_dim))
    x = t.layer_norm("ln_k")(x)
    q = t.layer_norm("ln_q")(query)
    q = jnp.broadcast_to(q, (x.shape[0], *q.shape))
    return layers.Attention(self.num_heads, implementation=t.attention_impl, dtype=t.dtype, name="attn")(q, x)


class VisionTransformer(nn.Module):
  """ViT returning a global image feature and per-token features.

  pool="tok": pooled = ln_post(x)[:, 0] @ proj, tokens = ln_post(x)[:, 1:] (one token per kept patch).
  pool="attn": open_clip's coca_ViT-* pooling: x = ln_post(attn_pool(x)); pooled = x[:, 0] @ proj,
    tokens = x[:, 1:] (num_queries - 1 learned summaries, no longer one per patch), and patch_tokens: the
    transformer's outputs for the kept patches, what the TG-MIM decoder rebuilds the image from.
  """

  tower: layers.TowerConfig
  image_size: int
  patch_size: int
  embed_dim: int
  pool: str = "tok"
  stem: str = "linear"
  stem_channels: Sequence[int] = (32, 32, 64, 64, 128)
  attn_pooler_queries: int = 256
  attn_pooler_heads: int = 8

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def setup(self):
    # open_clip's ViT: conv1 keeps PyTorch's default Conv2d init, kaiming_uniform(a=sqrt(5)), which is
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = 3 p p, i.e. variance 1 / (3 fan_in); the embeddings and
    # the projection are width ** -0.5 * randn. Its blocks keep PyTorch's defaults (no depth scaling).
    t = self.tower
    scale = t.width ** -0.5
    if self.stem == "linear":
      # A linear map of flattened patches == open_clip's bias-free strided conv1.
      self.conv1 = nn.Dense(t.width, use_bias=False, dtype=t.dtype,
                            kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))
    elif self.stem == "patch_cnn":
      self.patch_cnn = PatchCNN(t.width, tuple(self.stem_channels), t.norm_eps, t.dtype)
    else:
      raise ValueError(f"stem={self.stem!r}: choose from {STEMS}.")
    self.class_embedding = self.param("class_embedding", nn.initializers.normal(scale), (t.width,))
    self.positional_embedding = self.param(
        "positional_embedding", nn.initializers.normal(scale), (self.num_patches + 1, t.width))
    self.ln_pre = t.layer_norm()
    self.transformer = layers.Transformer(t)
    if self.pool == "attn":
      self.attn_pool = AttentionalPooler(t, self.attn_pooler_queries, self.embed_dim, self.attn_pooler_heads)
      pool_dim = self.embed_dim
    else:
      pool_dim = t.width
    self.ln_post = t.layer_norm()
    self.proj = self.param("proj", nn.initializers.normal(scale), (pool_dim, self.embed_dim))

  def __call__(self, images: jax.Array, ids_keep: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """images [B, H, W, 3]; ids_keep [B, K] patch indices to encode (all N when None).

    Returns pooled [B, E] (unnormalised, float32), tokens [B, K or Q-1, D'] for the captioner, and, with pool="tok",
    patch_embeddings [B, K, E]: each token projected into the joint space (what attentive masking scores);
    with pool="attn", patch_tokens [B, K, D] (with pool="tok" the tokens are the patch tokens).
    """
    patches = patchify(images.astype(self.tower.dtype), self.patch_size)  # [B, N, P]
    if self.stem == "linear":
      x = self.conv1(patches) + self.positional_embedding[1:].astype(self.tower.dtype)
      x = layers.take_tokens(x, ids_keep)
    else:
      # Only the kept patches go through the stem: the convolutions cost most of the TG-MIM pass otherwise.
      patches = layers.take_tokens(patches, ids_keep)
      p = self.patch_size
      x = self.patch_cnn(patches.reshape(*patches.shape[:2], p, p, -1))
      positions = jnp.broadcast_to(self.positional_embedding[1:], (x.shape[0], self.num_patches, self.tower.width))
      x = x + layers.take_tokens(positions, ids_keep).astype(x.dtype)
    cls = (self.class_embedding + self.positional_embedding[0]).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.tower.width)), x], axis=1)
    x = self.transformer(self.ln_pre(x))

    if self.pool == "attn":
      patch_tokens = x[:, 1:]
      x = self.ln_post(self.attn_pool(x))
      return {"pooled": layers.matmul_f32(x[:, 0], self.proj), "tokens": x[:, 1:], "patch_tokens": patch_tokens}
    x = self.ln_post(x)
    # The pooled embedding feeds the contrastive logits (times a temperature up to 100): kept in float32.
    return {"pooled": layers.matmul_f32(x[:, 0], self.proj), "tokens": x[:, 1:],
            "patch_embeddings": x[:, 1:] @ self.proj.astype(x.dtype)}
