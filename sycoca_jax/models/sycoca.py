"""SyCoCa: CoCa's contrastive + captioning towers, made symmetric with text-guided masked image modeling.

Shape legend: B batch, N patches, L text tokens, D width, E joint embedding, V vocabulary, P pixels per patch.

One forward pass (`SyCoCa.__call__`), with the heads that the enabled objectives need:
  1. full image pass     E_v(image)            -> image embedding (ITC), patch embeddings, patch tokens
  2. text pass           E_t(text)             -> text embedding (ITC), token features, token embeddings
  3. attentive masking   scores(patches, tokens) -> IC patch set, TG-MIM visible / hidden sets
  4. IC head             D_t(token features[:-1], IC patch tokens)  -> next-token logits
  5. TG-MIM head         E_v(visible patches only), then D_v(visible, mask tokens, token features) -> pixels

Every tower is always created (the parameter tree does not depend on which objectives are on, so checkpoints
move freely between the ablation configs); `heads` decides which ones run.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sycoca_jax import pixels
from sycoca_jax.models import layers
from sycoca_jax.models import masking as masking_lib
from sycoca_jax.models import vit
from sycoca_jax.models.image_decoder import ImageDecoder
from sycoca_jax.models.text import TextDecoder, TextEncoder
from sycoca_jax.models.vit import VisionTransformer

HEADS = ("itc", "ic", "mim")  # the paper's three objectives
OPTIONAL_HEADS = ("words",)   # heads a model has only when its config builds them (model.words_head)
# Outputs for a loss that needs no head of its own: 'token' returns the joint-space patch and token embeddings.
EXTRA_OUTPUTS = ("token",)


class SyCoCa(nn.Module):
  image_encoder: VisionTransformer
  text_encoder: TextEncoder
  text_decoder: TextDecoder
  image_decoder: ImageDecoder
  masking: str = "attentive"
  mask_score: str = "tokens"  # masking.score: what attentive masking compares each patch with (MASK_SCORES)
  end_token: bool = True  # masking.end_token: whether the end token counts among the caption's tokens
  ic_ratio: float = 0.5
  mim_ratio: float = 0.5
  ic_reencode: bool = False
  init_logit_scale: float = math.log(1 / 0.07)
  init_logit_bias: float = -10.0   # SigLIP's; only the sigmoid contrastive loss reads the bias
  pad_id: int = 0
  words_head: bool = False  # model.words_head: a caption-words head on the pooled image embedding
  words_pool: str = "mean"  # model.words_pool: what the head reads (WORDS_POOLS)
  words_grad: str = "full"  # model.words_grad: what of the head's gradient reaches the tower (WORDS_GRADS)
  noun_ids: tuple[int, ...] = ()  # the vocabulary ids masking.score="nouns" reads (the scenes' nouns)

  def setup(self):
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.init_logit_scale), ())
    # Created whatever the loss, so that the parameter tree stays one across configs (and checkpoints move).
    self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.init_logit_bias), ())
    if self.words_head:
      # The pooled image embedding -> one logit per vocabulary word (losses.words_loss). A random kernel, not zeros:
      # from a zero kernel every image's gradient points along the pooled embeddings' common mean, and the tower
      # learns nothing from the head (measured: colour at chance after 300 steps, 53 % with this init).
      self.word_head = nn.Dense(self.text_decoder.vocab_size, name="word_head")

  # -- Pieces, each usable on its own through `model.apply(params, ..., method=...)`. --------------------------

  def temperature(self) -> jax.Array:
    """exp(logit_scale), unclamped: the optimizer keeps logit_scale in [0, log 100] (optim.param_bounds), as
    open_clip clamps it after each step. A clamp here would zero its gradient past the cap for good."""
    return jnp.exp(self.logit_scale)

  def bias(self) -> jax.Array:
    """The sigmoid contrastive loss's logit bias (the softmax loss is blind to any shift of its logits)."""
    return self.logit_bias

  def encode_image(self, images: jax.Array, ids_keep: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """images [B, H, W, 3] -> {'embedding' [B, E] (L2-normalised), 'tokens', 'patch_embeddings', 'pooled'}.

    uint8 images are pixels, normalised here on the device (pixels.normalize); float ones are normalised already.
    """
    out = dict(self.image_encoder(pixels.normalize(images), ids_keep))
    out["embedding"] = layers.normalize(out["pooled"])
    return out

  def encode_text(self, text: jax.Array) -> dict[str, jax.Array]:
    """text [B, L] -> {'embedding' [B, E] (L2-normalised), 'tokens' [B, L, D], 'token_embeddings', 'pooled'}."""
    out = dict(self.text_encoder(text))
    out["embedding"] = layers.normalize(out["pooled"])
    return out

  def caption_logits(self, image_tokens: jax.Array, text: jax.Array) -> jax.Array:
    """Teacher-forced logits [B, L - 1, V]: position t predicts token t + 1 of `text` [B, L]."""
    tokens = self.text_encoder(text)["tokens"]
    return self.text_decoder(tokens[:, :-1], image_tokens)

  def decode_step(self, image_tokens: jax.Array, tokens: jax.Array, start: Any) -> jax.Array:
    """Cached sampling step: the logits [B, l, V] for `tokens` [B, l] at positions start .. start + l - 1."""
    features = self.text_encoder.encode_tokens(tokens, decode=True, start=start)
    return self.text_decoder(features, image_tokens, decode=True)

  def caption_features(self, image_tokens: jax.Array, text: jax.Array) -> jax.Array:
    """The multimodal decoder's final features [B, L, D] (for VQA / classification heads)."""
    tokens = self.text_encoder(text)["tokens"]
    return self.text_decoder(tokens, image_tokens, return_features=True)

  def word_logits(self, images: jax.Array) -> jax.Array:
    """The caption-words head's logits [B, V] for images [B, H, W, 3] (model.words_head)."""
    return self._word_logits(self.encode_image(images))

  def _word_logits(self, image_out: dict[str, jax.Array]) -> jax.Array:
    if self.words_pool == "max":
      # Each patch embedding through the head, the image's logit a word's best patch's (multiple-instance
      # learning): a word's evidence must sit in one patch, so the head's per-patch logits can locate it.
      features = image_out.get("patch_embeddings")
      if features is None:
        raise ValueError("model.words_pool='max' needs per-patch tokens: model.vision.pool must not be 'attn'.")
    else:
      features = image_out["pooled"]
    if self.words_grad == "centred":
      # The head's loss is lowered first by the words' frequencies, image-blind; through the embeddings it does
      # that by moving every image's the same way, which leaves the contrastive loss nothing to tell them apart
      # by. Without the gradient's batch mean the head's bias learns the frequencies, and the tower only what
      # tells one image's words from another's.
      features = layers.centre_gradient(features)
    logits = self.word_head(features.astype(jnp.float32))
    return logits.max(axis=1) if self.words_pool == "max" else logits

  def caption_tokens(self, text: jax.Array) -> jax.Array:
    """bool [B, L]: the tokens that attentive masking and the token loss read.

    Not the start token, not padding, and, with masking.end_token=False, not the end token: every row is
    [start, words..., end, padding...], so the end token is the last one before the padding.
    """
    valid = (text != self.pad_id) & (jnp.arange(text.shape[1]) > 0)[None]
    if self.end_token:
      return valid
    end = valid.sum(-1, keepdims=True)                                             # [B, 1]: the end token's position
    return valid & (jnp.arange(text.shape[1])[None] != end)

  def choose_masks(self, rng, image_out, text_out, text) -> masking_lib.Masks:
    patch_embeddings = image_out.get("patch_embeddings")
    if patch_embeddings is None:  # attentional pooling: no per-patch tokens, only their count matters
      if self.masking == "attentive":
        raise ValueError("masking.strategy='attentive' needs per-patch tokens: model.vision.pool must not be 'attn'.")
      patch_embeddings = jnp.zeros((text.shape[0], self.image_encoder.num_patches, 1))
    if self.mask_score == "words" and self.masking == "attentive":
      # Each patch's logits for the caption's words, from the caption-words head (loss.words_weight).
      vectors = self.word_head.variables["params"]["kernel"].T[text]             # [B, L, E]
      valid = self.caption_tokens(text)
      scores = masking_lib.word_scores(patch_embeddings, vectors, valid)
      return masking_lib.masks_from_scores(scores, self.ic_ratio, self.mim_ratio)
    if self.mask_score == "nouns" and self.masking == "attentive":
      # Each patch's log-probability of the caption's nouns under the head's softmax over the nouns.
      head = self.word_head.variables["params"]
      valid = self.caption_tokens(text)
      scores = masking_lib.noun_scores(patch_embeddings, head["kernel"], head["bias"], text,
                                       jnp.asarray(self.noun_ids, jnp.int32), valid)
      return masking_lib.masks_from_scores(scores, self.ic_ratio, self.mim_ratio)
    if self.mask_score == "caption":
      # Each patch against the caption's global embedding, the one vector ITC trains to match the image.
      tokens, valid = text_out["pooled"][:, None], jnp.ones((text.shape[0], 1), bool)
    else:
      # The start token and padding carry no caption content; the appended CLS is not among the tokens.
      tokens, valid = text_out["token_embeddings"], self.caption_tokens(text)
    return masking_lib.get_strategy(self.masking)(
        rng, patch_embeddings=patch_embeddings, token_embeddings=tokens, token_valid=valid,
        ic_ratio=self.ic_ratio, mim_ratio=self.mim_ratio)

  # -- The training forward pass. -------------------------------------------------------------------------------

  def __call__(self, images: jax.Array, text: jax.Array, *, rng: Optional[jax.Array] = None,
               heads: Sequence[str] = HEADS) -> dict[str, Any]:
    """images [B, H, W, 3] (uint8 pixels, or float normalised already), text [B, L] -> named outputs.

    Always: image_embedding, text_embedding [B, E], logit_scale (the temperature, exp(logit_scale)), logit_bias.
    'ic' in heads: caption_logits [B, L - 1, V].   'mim' in heads: mim_pred [B, N, P].
    'words' in heads: word_logits [B, V] (which words the image's caption holds).
    'token' in heads: patch_embeddings [B, N, E], token_embeddings [B, L, E] and token_valid [B, L] (the token loss).
    When masking runs: masks (a masking.Masks: the chosen index sets, for losses and visualisation).
    `rng` feeds the `random` strategy; the others are deterministic.
    """
    unknown = set(heads) - set(HEADS + OPTIONAL_HEADS + EXTRA_OUTPUTS)
    if unknown:
      raise ValueError(f"Unknown heads {sorted(unknown)}; choose from {HEADS + OPTIONAL_HEADS + EXTRA_OUTPUTS}.")
    images = pixels.normalize(images)  # the re-encoding passes below take the same floats
    image_out = self.encode_image(images)
    text_out = self.encode_text(text)
    out: dict[str, Any] = {
        "image_embedding": image_out["embedding"],
        "text_embedding": text_out["embedding"],
        "logit_scale": self.temperature(),
        "logit_bias": self.bias(),
    }

    if "words" in heads:
      if not self.words_head:
        raise ValueError("The 'words' head needs a model built with model.words_head=True.")
      out["word_logits"] = self._word_logits(image_out)

    if "token" in heads:
      if "patch_embeddings" not in image_out:
        raise ValueError("loss.token_weight needs per-patch embeddings: model.vision.pool must not be 'attn'.")
      out["patch_embeddings"] = image_out["patch_embeddings"]
      out["token_embeddings"] = text_out["token_embeddings"]
      out["token_valid"] = self.caption_tokens(text)

    needs_masks = ("ic" in heads and self.ic_ratio > 0) or "mim" in heads
    masks = None
    if needs_masks:
      if rng is None:
        rng = jax.random.PRNGKey(0)
      masks = self.choose_masks(rng, image_out, text_out, text)
      out["masks"] = masks

    if "ic" in heads:
      if masks is not None and masks.ic_keep is not None:
        if self.ic_reencode or self.image_encoder.pool == "attn":
          # With attentional pooling the tokens are query summaries, not patches: pool the kept patches.
          image_tokens = self.image_encoder(images, masks.ic_keep)["tokens"]
        else:
          image_tokens = layers.take_tokens(image_out["tokens"], masks.ic_keep)
      else:
        image_tokens = image_out["tokens"]
      out["caption_logits"] = self.text_decoder(text_out["tokens"][:, :-1], image_tokens)

    if "mim" in heads:
      if masks.mim_keep is None:
        raise ValueError("The TG-MIM objective needs masking.mim_ratio > 0.")
      # Second, cheaper encoder pass over the visible patches only: hidden content cannot leak through
      # self-attention, as it could if the full pass's tokens were reused.
      visible = self.image_encoder(images, masks.mim_keep)
      # One token per visible patch: with attentional pooling the `tokens` are query summaries, not patches.
      visible = visible.get("patch_tokens", visible["tokens"])
      out["mim_pred"] = self.image_decoder(visible, masks.mim_restore, text_out["tokens"], text != self.pad_id)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Configuration.
# ------------------------------------------------------------------------------------------------------------------


def default_model_config() -> ml_collections.ConfigDict:
  """The paper's CoCa-Base geometry (open_clip `coca_base` with CLIP BPE) and SyCoCa masking defaults."""
  return ml_collections.ConfigDict(dict(
      embed_dim=512,
      act="gelu",                # gelu | gelu_tanh | quick_gelu
      norm_eps=1e-5,
      dtype="float32",           # compute dtype; parameters are always float32
      attention_impl="xla",      # xla | cudnn (cuDNN flash attention: NVIDIA GPUs, bf16 / f16) | splash (TPU Pallas)
      remat=False,
      remat_policy="full",       # with remat: full | dots (what each layer keeps; see layers.REMAT_POLICIES)
      scan_layers=False,
      pad_id=0,
      init_logit_scale=math.log(1 / 0.07),   # its bounds, [0, log 100], are the optimizer's (optim.param_bounds)
      # stem: how a patch becomes a token (vit.STEMS); stem_channels: the patch_cnn and conv stems' conv widths.
      vision=dict(image_size=288, patch_size=18, width=768, depth=12, heads=12, mlp_ratio=4.0,
                  pool="tok", attn_pooler_queries=256, attn_pooler_heads=8, stem="linear",
                  stem_channels=(32, 32, 64, 64, 128), stem_norm="none",
                  stem_space_to_depth=1,
                  # registers: learned tokens beside the CLS token that no output reads (0: none).
                  registers=0),
      text=dict(vocab_size=49408, context_length=76, width=768, depth=12, heads=12, mlp_ratio=4.0,
                legacy_cls_mask=False),
      text_decoder=dict(width=768, depth=12, heads=12, mlp_ratio=4.0),
      image_decoder=dict(width=512, depth=8, heads=16, mlp_ratio=4.0, cross_attention=True),
      # score: "tokens", the paper's (a patch's max cosine with the caption's projected word tokens), or
      # "caption" (its cosine with the caption's global embedding, which ITC aligns with the image's), or "words"
      # (its logits for the caption's words from the caption-words head; needs words_head), or "nouns" (each
      # patch's log-probability of the caption's nouns under that head's softmax over the nouns; needs words_head
      # and the scenes' word tokenizer).
      # end_token: whether the caption's end token is among the tokens that "tokens" (and "words", "nouns") and the
      # token loss read. The causal text tower's end token has read the whole caption, so it is a second summary of
      # it, not a word; with False only the words count.
      masking=dict(strategy="attentive", ic_ratio=0.5, mim_ratio=0.5, ic_reencode=False, score="tokens",
                   end_token=True),
      # A linear head naming the caption's words from the pooled image embedding (loss.words_weight trains it).
      # words_pool: "mean", the head on the pooled embedding; "max", the head on every patch embedding and a word's
      # logit its best patch's (multiple-instance learning; needs per-patch tokens, vision.pool not "attn").
      # words_grad: what of the head's gradient reaches the image tower: "full", or "centred" (less its mean over
      # the batch, so the head cannot move every image's embedding the same way; exact only without gradient
      # accumulation, where the batch is the micro-batch).
      words_head=False, words_pool="mean", words_grad="full",
  ))


MASK_SCORES = ("tokens", "caption", "words", "nouns")
WORDS_POOLS = ("mean", "max")
WORDS_GRADS = ("full", "centred")


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending key, before anything is compiled."""

  def fail(key, msg):
    raise ValueError(f"config.model.{key}: {msg}")

  v, t, d, m = cfg.vision, cfg.text, cfg.text_decoder, cfg.masking
  if v.image_size % v.patch_size:
    fail("vision.image_size", f"{v.image_size} is not divisible by vision.patch_size={v.patch_size}.")
  for key, tower in (("vision", v), ("text", t), ("text_decoder", d), ("image_decoder", cfg.image_decoder)):
    if tower.width % tower.heads:
      fail(f"{key}.width", f"{tower.width} is not divisible by {key}.heads={tower.heads}.")
  if v.stem not in vit.STEMS:
    fail("vision.stem", f"{v.stem!r} is not one of {', '.join(vit.STEMS)}.")
  if v.stem != "linear" and (not v.stem_channels or any(int(c) < 1 for c in v.stem_channels)):
    fail("vision.stem_channels", f"{tuple(v.stem_channels)} must be one or more positive widths.")
  if v.stem_norm not in vit.STEM_NORMS:
    fail("vision.stem_norm", f"{v.stem_norm!r} is not one of {', '.join(vit.STEM_NORMS)}.")
  s2d = v.stem_space_to_depth
  if s2d < 1 or v.patch_size % s2d:
    fail("vision.stem_space_to_depth", f"{s2d} must be a positive divisor of vision.patch_size={v.patch_size}.")
  factors = vit.pool_factors(v.patch_size // s2d)
  if v.stem == "conv" and len(v.stem_channels) < len(factors):
    fail("vision.stem_channels", f"the conv stem pools by the prime factors of patch_size / stem_space_to_depth "
         f"= {v.patch_size // s2d}, {factors}, at least one convolution before each pool: give {len(factors)} "
         f"or more widths, not {len(v.stem_channels)}.")
  if v.pool not in vit.POOLS:
    fail("vision.pool", f"{v.pool!r} is not one of {', '.join(vit.POOLS)}.")
  if not isinstance(v.registers, int) or v.registers < 0:
    fail("vision.registers", f"{v.registers!r} must be an integer >= 0 (0: none).")
  if t.width != d.width:
    fail("text_decoder.width", f"must equal text.width={t.width}: the decoder continues the text features.")
  if cfg.act not in layers.ACTIVATIONS:
    fail("act", f"{cfg.act!r} is not one of {sorted(layers.ACTIVATIONS)}.")
  if cfg.dtype not in ("float32", "bfloat16", "float16"):
    fail("dtype", f"{cfg.dtype!r} is not one of float32, bfloat16, float16.")
  if cfg.remat_policy not in layers.REMAT_POLICIES:
    fail("remat_policy", f"{cfg.remat_policy!r} is not one of {', '.join(layers.REMAT_POLICIES)}.")
  if cfg.attention_impl not in layers.ATTENTION_IMPLS:
    fail("attention_impl", f"{cfg.attention_impl!r} is not one of {', '.join(layers.ATTENTION_IMPLS)}.")
  if cfg.attention_impl == "cudnn":
    if cfg.dtype == "float32":
      fail("attention_impl", "'cudnn' (flash attention) runs in bfloat16 or float16: set model.dtype='bfloat16', "
           "or use 'xla'.")
    for key, tower in (("vision", v), ("text", t), ("text_decoder", d), ("image_decoder", cfg.image_decoder)):
      if (tower.width // tower.heads) % 8:
        fail(f"{key}.heads", f"'cudnn' attention needs a head width (width / heads = {tower.width // tower.heads})"
             " that is a multiple of 8.")
  if m.strategy not in masking_lib.STRATEGIES:
    fail("masking.strategy", f"{m.strategy!r} is not one of {sorted(masking_lib.STRATEGIES)}.")
  for key in ("ic_ratio", "mim_ratio"):
    r = m[key]
    if not 0.0 <= r < 1.0:
      fail(f"masking.{key}", f"{r} must be in (0, 1), or 0 to switch that head's masking off.")
  if m.score not in MASK_SCORES:
    fail("masking.score", f"{m.score!r} is not one of {', '.join(MASK_SCORES)}.")
  if cfg.words_pool not in WORDS_POOLS:
    fail("words_pool", f"{cfg.words_pool!r} is not one of {', '.join(map(repr, WORDS_POOLS))}.")
  if cfg.words_grad not in WORDS_GRADS:
    fail("words_grad", f"{cfg.words_grad!r} is not one of {', '.join(map(repr, WORDS_GRADS))}.")
  if cfg.words_head and cfg.words_pool == "max" and v.pool == "attn":
    fail("words_pool", "'max' reads every patch embedding, and vision.pool='attn' has none.")
  if m.score == "nouns" and not cfg.words_head:
    fail("masking.score", "'nouns' ranks patches by the caption-words head: set model.words_head=True.")
  if m.score == "words" and not cfg.words_head:
    fail("masking.score", "'words' ranks patches by the caption-words head: set model.words_head=True.")
  if m.strategy == "none" and (m.ic_ratio or m.mim_ratio):
    fail("masking.strategy", "'none' needs masking.ic_ratio = masking.mim_ratio = 0.")
  if m.strategy == "attentive" and v.pool == "attn":
    fail("masking.strategy", "'attentive' scores every patch and needs one token per patch: model.vision.pool "
         "'tok', 'gap' or 'max', not 'attn'.")


def build_model(cfg: ml_collections.ConfigDict) -> SyCoCa:
  """The SyCoCa module for a model config (see `default_model_config`)."""
  validate_model_config(cfg)

  def tower(c: ml_collections.ConfigDict) -> layers.TowerConfig:
    """A tower's own geometry (config.model.<tower>) with the model-wide settings."""
    # `remat` takes the policy's name in place of True.
    return layers.TowerConfig(
        c.width, c.depth, c.heads, c.mlp_ratio, act=cfg.act, norm_eps=cfg.norm_eps,
        remat=cfg.remat and cfg.remat_policy, scan=cfg.scan_layers, attention_impl=cfg.attention_impl,
        dtype=jnp.dtype(cfg.dtype))

  v, t, d, i = cfg.vision, cfg.text, cfg.text_decoder, cfg.image_decoder
  return SyCoCa(
      image_encoder=VisionTransformer(
          tower(v), v.image_size, v.patch_size, cfg.embed_dim, pool=v.pool, stem=v.stem,
          stem_channels=tuple(v.stem_channels), stem_norm=v.stem_norm, stem_space_to_depth=v.stem_space_to_depth,
          attn_pooler_queries=v.attn_pooler_queries, attn_pooler_heads=v.attn_pooler_heads, registers=v.registers),
      text_encoder=TextEncoder(
          tower(t), t.vocab_size, t.context_length, cfg.embed_dim, pad_id=cfg.pad_id,
          legacy_cls_mask=t.legacy_cls_mask),
      text_decoder=TextDecoder(tower(d), t.vocab_size),
      image_decoder=ImageDecoder(
          tower(i), (v.image_size // v.patch_size) ** 2, v.patch_size ** 2 * 3, cross_attention=i.cross_attention),
      masking=cfg.masking.strategy,
      ic_ratio=cfg.masking.ic_ratio,
      mim_ratio=cfg.masking.mim_ratio,
      ic_reencode=cfg.masking.ic_reencode,
      mask_score=cfg.masking.score,
      end_token=cfg.masking.end_token,
      init_logit_scale=cfg.init_logit_scale,
      pad_id=cfg.pad_id,
      words_head=cfg.words_head,
      words_pool=cfg.words_pool,
      words_grad=cfg.words_grad,
      noun_ids=_noun_ids(cfg.text.vocab_size) if cfg.masking.score == "nouns" else (),
  )


def _noun_ids(vocab_size: int) -> tuple[int, ...]:
  """The built-in scenes' nouns as ids of the scenes' word tokenizer, checked to fit the model's vocabulary."""
  from sycoca_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  ids = tokenizers.scenes_noun_ids()
  if max(ids) >= vocab_size:
    raise ValueError(f"config.model.masking.score: 'nouns' are ids of the scenes' word tokenizer (up to {max(ids)}), "
                     f"beyond model.text.vocab_size={vocab_size}.")
  return ids


def init_params(model: SyCoCa, rng: jax.Array, batch_size: int = 1) -> Any:
  """Initialises every tower (all heads run once on a dummy batch)."""
  size = model.image_encoder.image_size
  images = jnp.zeros((batch_size, size, size, 3), jnp.float32)
  text = jnp.ones((batch_size, model.text_encoder.context_length), jnp.int32)
  # Masking has no parameters; initialising through a 50/50 random-masking copy builds every tower whatever
  # this config's objectives and ratios, so all configs share one parameter tree.
  init_model = model.clone(masking="random", ic_ratio=0.5, mim_ratio=0.5)
  # Jitted: one program instead of hundreds of op-by-op dispatches, which compiles faster and is cached whole
  # (inside the train step's jitted init it is simply inlined).
  heads = HEADS + (("words",) if model.words_head else ())
  return jax.jit(lambda r: init_model.init({"params": r}, images, text, rng=r, heads=heads)["params"])(rng)
