"""Transformer building blocks shared by every tower.

Shape legend (used across sycoca_jax.models):
  B batch, N image patches, L text tokens, S key/value length, D width, H heads,
  E joint embedding size, V vocabulary, P pixels per patch (p * p * 3).

Parameter names follow open_clip's (ln_1, attn, ln_1_kv, ln_2, mlp/c_fc, mlp/c_proj) so that importing its
CoCa checkpoints is a renaming, not a re-plumbing. Parameters are float32; `dtype` sets the compute type.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from sycoca_jax.sharding import BATCH_AXES

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # torch.nn.GELU, as open_clip uses
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # OpenAI CLIP's
}


@dataclasses.dataclass(frozen=True)
class InitStds:
  """Normal stds of a transformer's kernels (None in a tower: flax's lecun-normal defaults, as PyTorch's ViT).

  attn: the q, k, v projections; proj: the attention output and MLP c_proj, the last layer of each residual
  branch; fc: MLP c_fc.
  """

  attn: float
  proj: float
  fc: float

  @classmethod
  def open_clip(cls, width: int, depth: int) -> "InitStds":
    """open_clip's TextTransformer / MultimodalTransformer init_parameters.

    The residual branches' output layers shrink with depth, (2 * depth) ** -0.5, so the residual stream does not
    grow with the number of blocks at initialisation.
    """
    return cls(attn=width ** -0.5, proj=width ** -0.5 * (2 * depth) ** -0.5, fc=(2 * width) ** -0.5)


def kernel_init(stds: Optional[InitStds], kind: str) -> Callable[..., jax.Array]:
  """N(0, stds.<kind>), or flax's default (lecun normal) without stds."""
  return nn.initializers.normal(getattr(stds, kind)) if stds is not None else nn.linear.default_kernel_init


# dot_general whose result (and accumulation) is float32 whatever its operands' dtype: for the layers whose output
# feeds a loss (vocabulary logits, pixel predictions, contrastive embeddings). Under bf16 the operands stay bf16,
# so the matmul runs at bf16 speed, but the output is not rounded to bf16's 8 significant bits before the loss.
dot_general_f32 = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


def matmul_f32(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., D] @ w [D, F] -> float32 [..., F]: w cast to x's (compute) dtype, accumulated and returned in f32."""
  return jnp.einsum("...d,df->...f", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


# Attention kernels (model.attention_impl), as jax.nn.dot_product_attention names them: 'xla' runs anywhere;
# 'cudnn' is cuDNN's flash attention on NVIDIA GPUs (bfloat16 / float16 only), which never forms the [B, H, L, S]
# logits. Masks are therefore given the way flash attention takes them where possible: a causal flag and
# per-example key lengths (captions are right-padded, so their valid tokens are a prefix). A boolean mask is
# only passed where neither expresses the pattern (the text encoder's CLS, under 'xla'), and then as
# [B, 1, 1, S], never a full [B, H, L, S]. 'splash' is the same for TPUs: Pallas' splash attention kernel
# (splash_attention below).
ATTENTION_IMPLS = ("xla", "cudnn", "splash")

# Splash attention's key blocks are whole multiples of a TPU vector register's 128 lanes: sequences are padded to
# one, and the padding is hidden from real queries by segment ids (see splash_attention).
_SPLASH_BLOCK = 128


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool):
  """One example's kernel, q [H, q_len, Dh] x k, v [H, kv_len, Dh] -> [H, q_len, Dh] (lengths padded)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks  # pylint: disable=g-import-not-at-top
  shape = (q_len, kv_len)
  mask = masks.MultiHeadMask([masks.CausalMask(shape) if causal else masks.FullMask(shape)] * heads)
  block = dict(block_q=min(q_len, 512), block_kv=min(kv_len, 512), block_kv_compute=_SPLASH_BLOCK)
  sizes = splash.BlockSizes(**block, block_q_dkv=block["block_q"], block_kv_dkv=block["block_kv"],
                            block_kv_dkv_compute=_SPLASH_BLOCK, block_q_dq=block["block_q"],
                            block_kv_dq=block["block_kv"])
  # Built once per shape, outside any trace (the kernel keeps the mask's block tables as constants).
  with jax.ensure_compile_time_eval():
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
  return kernel, splash


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                     kv_lengths: Optional[jax.Array] = None) -> jax.Array:
  """Softmax attention by Pallas' splash attention kernel: q [B, L, H, Dh], k and v [B, S, H, Dh] -> [B, L, H, Dh].

  The kernel keeps the [L, S] logits of a block of queries in the chip's vector memory: neither they nor the
  probabilities are written to HBM, in the forward or the backward pass. Both lengths are padded to a multiple
  of 128 (its key block); segment ids give real queries segment 1 and keys segment 1 up to `kv_lengths` [B]
  (all keys without it), so no real query sees a padded or hidden key. Under a mesh in context
  (jax.sharding.use_abstract_mesh, as the train step sets it) the kernel runs per chip on its examples under
  shard_map; a Pallas kernel cannot be split by the compiler itself. Elsewhere (the evaluators trace without a
  mesh in context) the call is left to the compiler's partitioner, which has to gather a split batch whole to
  run it: not checked on a TPU. On TPU it is the Mosaic kernel; on other platforms the same kernel runs
  interpreted (slowly: for tests).
  """
  b, l, h, dh = q.shape
  s = k.shape[1]
  pad_to = lambda n: -(-n // _SPLASH_BLOCK) * _SPLASH_BLOCK
  lp, sp = pad_to(l), pad_to(s)
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s, jnp.int32)

  def per_chip(q, k, v, kv_lengths):
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    q_ids = jnp.broadcast_to(jnp.arange(lp) < l, (q.shape[0], lp)).astype(jnp.int32)
    kv_ids = (jnp.arange(sp)[None] < kv_lengths[:, None]).astype(jnp.int32)
    args = (pad(q * jnp.asarray(dh ** -0.5, q.dtype), lp), pad(k, sp), pad(v, sp), q_ids, kv_ids)

    def run(interpret):
      kernel, splash = _splash_kernel(h, lp, sp, causal, interpret)
      one = lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=splash.SegmentIds(qi, ki))
      return lambda *a: jax.vmap(one)(*a)

    out = jax.lax.platform_dependent(*args, tpu=run(False), default=run(True))
    return out.transpose(0, 2, 1, 3)[:, :l]

  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  if axes:
    spec = jax.sharding.PartitionSpec(axes)
    per_chip = jax.shard_map(per_chip, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)
  return per_chip(q, k, v, kv_lengths)


def key_padding_mask(valid: jax.Array) -> jax.Array:
  """[B, S] validity -> [B, 1, 1, S] boolean attention mask."""
  return valid[:, None, None, :]


def valid_lengths(valid: jax.Array) -> jax.Array:
  """[B, S] validity of right-padded rows -> int32 [B]: how many keys each row has."""
  return valid.sum(axis=-1).astype(jnp.int32)


class Mlp(nn.Module):
  """Two-layer feed-forward block: D -> mlp_ratio * D -> D."""

  mlp_ratio: float = 4.0
  act: str = "gelu"
  init_stds: Optional[InitStds] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    init = lambda kind: kernel_init(self.init_stds, kind)
    x = nn.Dense(int(width * self.mlp_ratio), dtype=self.dtype, kernel_init=init("fc"), name="c_fc")(x)
    x = ACTIVATIONS[self.act](x)
    return nn.Dense(width, dtype=self.dtype, kernel_init=init("proj"), name="c_proj")(x)


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v projections and an optional decoding cache.

  Self-attention when `kv` is None, cross-attention otherwise (keys may have another width than queries).
  With `decode=True`, self-attention appends keys and values to a cache of the length the cache was initialised
  with, one step at a time: the autoregressive sampler in sycoca_jax.decoding relies on it. Cross-attention
  with `decode=True` projects its keys and values (the image tokens, fixed while sampling) once, on the call
  that creates the cache, and reuses them: otherwise every sampling step would re-project all N image tokens
  in every layer, which costs more than the rest of the step.

  Which keys a query sees: `causal` (query i sees keys <= i), `kv_lengths` int32 [B] (keys past a row's length
  are hidden) and `mask` [B or 1, 1, L, S] (True = visible), all combined. `implementation` picks the kernel
  (ATTENTION_IMPLS).
  """

  num_heads: int
  init_stds: Optional[InitStds] = None
  implementation: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, kv=None, mask=None, *, causal: bool = False, kv_lengths=None, decode: bool = False):
    width = x.shape[-1]
    cross = kv is not None
    kv = x if kv is None else kv

    def dense(name, kind="attn"):
      return nn.Dense(width, dtype=self.dtype, kernel_init=kernel_init(self.init_stds, kind), name=name)

    split = lambda t: einops.rearrange(t, "b s (h d) -> b s h d", h=self.num_heads)
    q, k, v = split(dense("query")(x)), split(dense("key")(kv)), split(dense("value")(kv))

    if decode and cross:
      # Once the cache exists the fresh projections above are unused, and jit drops them.
      cached_k = self.variable("cache", "cached_key", lambda: k)
      cached_v = self.variable("cache", "cached_value", lambda: v)
      k, v = cached_k.value, cached_v.value
    elif decode:
      # The cache is created by calling the model once with decode=True on a [B, max_len] input (the sampler
      # does this through `init`), and afterwards filled one position per call.
      is_initialized = self.has_variable("cache", "cached_key")
      cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        step = q.shape[1]
        i = index.value
        k = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, i, 0, 0))
        v = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, i, 0, 0))
        cached_k.value, cached_v.value = k, v
        index.value = i + step
        # Query at absolute position i + t sees keys 0 .. i + t: causal with an offset, which the causal flag
        # (query i sees key i, both counted from 0) cannot say. A [1, 1, step, max_len] mask is small.
        q_pos = i + jnp.arange(step)[:, None]
        k_pos = jnp.arange(k.shape[1])[None, :]
        mask = (k_pos <= q_pos)[None, None]

    implementation = self.implementation
    if decode:
      # Sampling: a few new queries against the cache (the call that creates it is discarded), with the causal
      # pattern in the mask above. That is a matrix-vector product with nothing for flash attention to save,
      # so XLA's kernel runs whatever `implementation` says.
      causal, implementation = False, "xla"
    if implementation == "splash":
      if mask is not None:
        raise ValueError("attention_impl='splash' takes a causal flag and key lengths, not a mask.")
      out = splash_attention(q, k, v, causal=causal, kv_lengths=kv_lengths)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, key_value_seq_lengths=kv_lengths,
                                         implementation=implementation)
    out = einops.rearrange(out, "b s h d -> b s (h d)")
    return dense("out", "proj")(out)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """What every transformer tower shares, declared once: a setting added here reaches each tower's blocks.

  width D, depth (layers), num_heads and mlp_ratio come from config.model.<tower>; the rest from the model-wide
  keys: act (a name in ACTIVATIONS), norm_eps, remat and scan (see Transformer), attention_impl (ATTENTION_IMPLS),
  and dtype, the compute type.
  """

  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  act: str = "gelu"
  norm_eps: float = 1e-5
  remat: Any = False   # False | True | a name in REMAT_POLICIES
  scan: bool = False
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32

  def layer_norm(self, name: Optional[str] = None) -> nn.LayerNorm:
    """A LayerNorm of the tower's eps, computing in its dtype."""
    return nn.LayerNorm(self.norm_eps, dtype=self.dtype, name=name)


class Block(nn.Module):
  """Pre-LN residual block: x + attn(ln_1(x) [, ln_1_kv(kv)]); x + mlp(ln_2(x)).

  A cross-attention block (`cross=True`) attends from x to `kv`, as open_clip's multimodal decoder does; its
  queries never attend to each other.
  """

  config: TowerConfig
  cross: bool = False
  init_stds: Optional[InitStds] = None

  @nn.compact
  def __call__(self, x, kv=None, mask=None, *, causal: bool = False, kv_lengths=None, decode: bool = False):
    c = self.config
    if self.cross:
      kv = c.layer_norm("ln_1_kv")(kv)
    attn = Attention(c.num_heads, init_stds=self.init_stds, implementation=c.attention_impl, dtype=c.dtype,
                     name="attn")
    x = x + attn(c.layer_norm("ln_1")(x), kv, mask, causal=causal, kv_lengths=kv_lengths, decode=decode)
    mlp = Mlp(c.mlp_ratio, c.act, init_stds=self.init_stds, dtype=c.dtype, name="mlp")
    return x + mlp(c.layer_norm("ln_2")(x))


# What a rematerialised layer keeps for the backward pass (model.remat_policy). 'full': only the layer's input, all
# else is recomputed (least memory; +24 % FLOPs on SyCoCa-Base). 'dots': also the outputs of its weight matmuls
# (q / k / v / out projections, MLP), so only attention scores, norms and activations are recomputed: a few
# percent more FLOPs for most of the memory saving.
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Transformer(nn.Module):
  """`config.depth` blocks; each layer is a self-attention block, followed by a cross-attention block if `cross`.

  `config.scan` stacks the layers' parameters on a leading axis and runs them with one `nn.scan` (faster
  compiles on deep models); `config.remat` recomputes each layer's activations in the backward pass: True or
  'full' keeps only the layer's input, another name of REMAT_POLICIES keeps what that policy saves. `init_stds`
  sets every block's kernel init (cross-attention blocks included, as open_clip's MultimodalTransformer).

  Self-attention sees keys by `causal`, `lengths` [B] and `mask`; cross-attention by `kv_lengths` [B] and
  `kv_mask` (see Attention).
  """

  config: TowerConfig
  cross: bool = False
  init_stds: Optional[InitStds] = None

  @nn.compact
  def __call__(self, x, kv=None, mask=None, kv_mask=None, *, causal: bool = False, lengths=None, kv_lengths=None,
               decode: bool = False):
    c = self.config
    layer_cls = _Layer
    if c.remat:
      policy = REMAT_POLICIES[c.remat if isinstance(c.remat, str) else "full"]
      layer_cls = nn.remat(_Layer, prevent_cse=not c.scan, policy=policy)
    kw = dict(config=c, cross=self.cross, causal=causal, decode=decode, init_stds=self.init_stds)
    args = (kv, mask, lengths, kv_mask, kv_lengths)
    if c.scan:
      stack = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * len(args), length=c.depth)
      x, _ = stack(**kw, name="layers")(x, *args)
    else:
      for i in range(c.depth):
        x, _ = layer_cls(**kw, name=f"layers_{i}")(x, *args)
    return x


class _Layer(nn.Module):
  """One layer of `Transformer`, with the (carry, out) signature that nn.scan wants."""

  config: TowerConfig
  cross: bool
  causal: bool
  decode: bool
  init_stds: Optional[InitStds]

  @nn.compact
  def __call__(self, x, kv, mask, lengths, kv_mask, kv_lengths):
    block = functools.partial(Block, self.config, init_stds=self.init_stds)
    x = block(name="self")(x, None, mask, causal=self.causal, kv_lengths=lengths, decode=self.decode)
    if self.cross:
      x = block(cross=True, name="cross")(x, kv, kv_mask, kv_lengths=kv_lengths, decode=self.decode)
    return x, None


def normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """L2-normalise in float32 (as torch.nn.functional.normalize)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


@jax.custom_vjp
def centre_gradient(x: jax.Array) -> jax.Array:
  """Identity forward; backward, the gradient less its mean over every axis but the last (the batch's images, and
  their patches for [B, N, D]): what reaches x can move the images apart but not all of them the same way."""
  return x


def _centre_gradient_fwd(x):
  return x, None


def _centre_gradient_bwd(_, g):
  return (g - g.mean(axis=tuple(range(g.ndim - 1)), keepdims=True),)


centre_gradient.defvjp(_centre_gradient_fwd, _centre_gradient_bwd)


def take_tokens(x: jax.Array, ids: Optional[jax.Array]) -> jax.Array:
  """Gathers tokens per example: x [B, N, D], ids [B, K] -> [B, K, D]; identity when ids is None.

  take_along_axis keeps the batch axis a batch dimension of the gather, so a batch-sharded input stays sharded
  (no all-gather of the tokens; tests/test_masking.py checks the compiled program).
  """
  if ids is None:
    return x
  return jnp.take_along_axis(x, ids[..., None], axis=1)
