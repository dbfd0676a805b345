"""The image encoder E_v: a pre-LN ViT that can encode any gathered subset of its patches.

Shapes as in layers.py, and p the patch side, C channels. Positions are added before the gather and the CLS
token is always kept, so encoding `ids_keep` is exactly "the same ViT, looking only at those patches" (MAE /
FLIP style).

The stem (`model.vision.stem`) turns each patch into a token. Whatever the stem, the TG-MIM pass, which encodes
the visible patches alone, can never see a hidden pixel (tests/test_model.py changes the hidden pixels and checks
the visible tokens bit for bit).
  linear     a linear map of the flattened patch (open_clip's strided conv1; the paper's ViT).
  patch_cnn  a small CNN run on each patch as its own image: 3x3 convolutions zero-padded at the patch border,
             two 2x2 max-pools and a max over the patch, then a linear map to the width. It brings the locality
             and translation invariance a linear embedding lacks; it normalises with a LayerNorm over each
             pixel's channels (batch statistics would mix hidden and visible patches).
  conv       a CNN over the whole image (ConvStem): its kernels cross patch borders, so it is not patch-local;
             a masked pass zeroes the hidden patches before every convolution instead (masked convolution, as
             ConvMAE and SparK), which gives the same guarantee for the encoded tokens.
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


STEMS = ("linear", "patch_cnn", "conv")
STEM_NORMS = ("none", "instance")  # the conv stem's normalisation (ConvStem)


def pool_factors(patch_size: int) -> tuple[int, ...]:
  """The conv stem's max-pool factors: the patch side's prime factors, smallest first (6 -> (2, 3))."""
  factors, n, f = [], patch_size, 2
  while n > 1:
    while n % f == 0:
      factors.append(f)
      n //= f
    f += 1
  return tuple(factors)


def conv_groups(num_convs: int, num_pools: int) -> list[int]:
  """How many of the conv stem's convolutions run at each of its num_pools + 1 resolutions, as evenly as can be,
  earlier resolutions first (5 convolutions, 2 pools -> [2, 2, 1])."""
  groups = num_pools + 1
  return [num_convs // groups + (i < num_convs % groups) for i in range(groups)]


class ConvStem(nn.Module):
  """The `conv` stem: a CNN over the whole image down to the patch grid, images [B, S, S, C] -> tokens [B, N, D].

  3x3 convolutions (each followed by the `norm`, "none" or "instance", and a ReLU) and max-pools whose factors
  multiply to the patch side, so that each pool window lies inside one patch. Its kernels overlap the patch
  borders: a token sees its neighbours' pixels, as in a CNN. With `visible` [B, g, g] (the patches a masked pass
  encodes), every hidden position is set to zero before every convolution and left out of the instance norm's
  statistics, so no hidden pixel reaches a visible token (ConvMAE / SparK's masked convolution). No statistic
  spans the batch.
  """

  width: int
  patch_size: int
  channels: Sequence[int] = (32, 32, 64, 64, 128)
  norm: str = "none"
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  space_to_depth: int = 1

  def _instance_norm(self, x, mask, name):
    """Per image and channel, over the (visible) positions; a learned scale and bias per channel."""
    x32 = x.astype(jnp.float32)
    weights = jnp.ones(x.shape[:3] + (1,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    count = jnp.maximum(weights.sum(axis=(1, 2), keepdims=True), 1.0)
    mean = (x32 * weights).sum(axis=(1, 2), keepdims=True) / count
    var = (jnp.square(x32 - mean) * weights).sum(axis=(1, 2), keepdims=True) / count
    scale = self.param(f"{name}_scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param(f"{name}_bias", nn.initializers.zeros, (x.shape[-1],))
    return ((x32 - mean) * jax.lax.rsqrt(var + self.norm_eps) * scale + bias).astype(x.dtype)

  @nn.compact
  def __call__(self, images: jax.Array, visible: Optional[jax.Array] = None) -> jax.Array:
    s2d = self.space_to_depth
    factors = pool_factors(self.patch_size // s2d)
    groups = conv_groups(len(self.channels), len(factors))
    x = einops.rearrange(images, "b (h p1) (w p2) c -> b h w (p1 p2 c)", p1=s2d, p2=s2d)
    side, index = self.patch_size // s2d, 0  # side: pixels per patch side at the current resolution
    for stage, count in enumerate(groups):
      mask = None  # the visible positions at this resolution
      if visible is not None:
        mask = jnp.repeat(jnp.repeat(visible, side, axis=1), side, axis=2)[..., None]
      for _ in range(count):
        if mask is not None:
          x = jnp.where(mask, x, jnp.zeros((), x.dtype))
        # Before the instance norm a bias would be subtracted again with the mean: it would get no gradient but
        # rounding noise, which Adam scales up to full-size steps (a parameter that only drifts).
        x = nn.Conv(self.channels[index], (3, 3), use_bias=self.norm == "none", dtype=self.dtype,
                    name=f"conv{index}")(x)
        if self.norm == "instance":
          x = self._instance_norm(x, mask, f"norm{index}")
        x = nn.relu(x)
        index += 1
      if stage < len(factors):
        f = factors[stage]
        x = nn.max_pool(x, (f, f), strides=(f, f))
        side //= f
    x = einops.rearrange(x, "b h w c -> b (h w) c")
    return nn.Dense(self.width, dtype=self.dtype, name="proj")(x)
POOLS = ("tok", "gap", "max", "attn")


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
  pool="gap": pooled = mean(ln_post(x)[:, 1:]) @ proj, the mean of the patch embeddings, so that the contrastive
    loss trains the very patch embeddings attentive masking compares with the caption's words.
  pool="max": pooled = max(ln_post(x)[:, 1:]) @ proj, the channel-wise max over the kept patches (a CNN's global
    max-pool: invariant to where in the image a feature fires).
  pool="attn": open_clip's coca_ViT-* pooling: x = ln_post(attn_pool(x)); pooled = x[:, 0] @ proj,
    tokens = x[:, 1:] (num_queries - 1 learned summaries, no longer one per patch), and patch_tokens: the
    transformer's outputs for the kept patches, what the TG-MIM decoder rebuilds the image from.
  With `registers` R > 0, R learned tokens follow the CLS token in the sequence and no output includes them (the
  patch tokens are x[:, 1 + R:]).
  """

  tower: layers.TowerConfig
  image_size: int
  patch_size: int
  embed_dim: int
  pool: str = "tok"
  stem: str = "linear"
  stem_channels: Sequence[int] = (32, 32, 64, 64, 128)
  stem_norm: str = "none"
  stem_space_to_depth: int = 1
  attn_pooler_queries: int = 256
  attn_pooler_heads: int = 8
  registers: int = 0

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
    elif self.stem == "conv":
      self.conv_stem = ConvStem(t.width, self.patch_size, tuple(self.stem_channels), self.stem_norm, t.norm_eps,
                                t.dtype, self.stem_space_to_depth)
    else:
      raise ValueError(f"stem={self.stem!r}: choose from {STEMS}.")
    self.class_embedding = self.param("class_embedding", nn.initializers.normal(scale), (t.width,))
    if self.registers:
      # Learned tokens beside the CLS token that no output reads (Darcet et al. 2024, "Vision Transformers need
      # registers"): a place for the transformer's global computation other than low-content patches.
      self.register_tokens = self.param("registers", nn.initializers.normal(scale), (self.registers, t.width))
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
    elif self.stem == "conv":
      visible = None
      if ids_keep is not None:
        grid = self.image_size // self.patch_size
        visible = jnp.zeros((images.shape[0], self.num_patches), bool)
        visible = visible.at[jnp.arange(images.shape[0])[:, None], ids_keep].set(True).reshape(-1, grid, grid)
      x = self.conv_stem(images.astype(self.tower.dtype), visible)
      x = layers.take_tokens(x + self.positional_embedding[1:].astype(x.dtype), ids_keep)
    else:
      # Only the kept patches go through the stem: the convolutions cost most of the TG-MIM pass otherwise.
      patches = layers.take_tokens(patches, ids_keep)
      p = self.patch_size
      x = self.patch_cnn(patches.reshape(*patches.shape[:2], p, p, -1))
      positions = jnp.broadcast_to(self.positional_embedding[1:], (x.shape[0], self.num_patches, self.tower.width))
      x = x + layers.take_tokens(positions, ids_keep).astype(x.dtype)
    cls = (self.class_embedding + self.positional_embedding[0]).astype(x.dtype)[None]
    if self.registers:
      cls = jnp.concatenate([cls, self.register_tokens.astype(x.dtype)], axis=0)   # [1 + R, D]
    first = cls.shape[0]  # the patches' tokens start after the CLS token and the registers
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], *cls.shape)), x], axis=1)
    x = self.transformer(self.ln_pre(x))

    if self.pool == "attn":
      patch_tokens = x[:, first:]
      x = self.ln_post(self.attn_pool(x))
      return {"pooled": layers.matmul_f32(x[:, 0], self.proj), "tokens": x[:, 1:], "patch_tokens": patch_tokens}
    x = self.ln_post(x)
    patches = x[:, first:]
    # The pooled embedding feeds the contrastive logits (times a temperature up to 100): kept in float32.
    if self.pool == "gap":
      pooled = layers.matmul_f32(patches.mean(axis=1, dtype=jnp.float32).astype(x.dtype), self.proj)
    elif self.pool == "max":
      pooled = layers.matmul_f32(patches.max(axis=1), self.proj)
    else:
      pooled = layers.matmul_f32(x[:, 0], self.proj)
    return {"pooled": pooled, "tokens": patches, "patch_embeddings": patches @ self.proj.astype(x.dtype)}
