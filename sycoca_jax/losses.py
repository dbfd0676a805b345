"""The three SyCoCa objectives and the one loss function the train step differentiates.

Shape legend: B batch (the global batch: under jit the arrays are global, so the contrastive loss sees every
device's examples as negatives), D devices the batch is split over, b = B / D examples per device, L text tokens,
V vocabulary, N patches, P pixels per patch, E joint embedding.

Two contrastive (ITC) losses, `config.loss.contrastive`: CLIP's softmax InfoNCE (the default) and SigLIP's
sigmoid loss. Both take their negatives from the whole global batch, and neither lets one device hold the
[B, B] logits (`config.loss.contrastive_impl='sharded'`): softmax computes each device's rows of them
(a [b, B] block), sigmoid passes the texts around the device ring and scores one [b, b] block at a time. The
dense formulas (`contrastive_loss`, `sigmoid_loss`) are the reference and `contrastive_impl='dense'`.

  L = w_itc * L_ITC + w_ic * L_IC + w_mim * L_TG-MIM        (paper: 1, 2, 1)

A weight of 0 switches that objective off, and its head is not even run. The captioner's next-token
log-likelihood (`sequence_log_likelihood`) is the one that evaluation and inference score captions with.
"""

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from sycoca_jax import pixels, sharding
from sycoca_jax.models import vit
from sycoca_jax.models.layers import normalize
from sycoca_jax.models.sycoca import SyCoCa

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
# (image_emb [B, E], text_emb [B, E], temperature, bias) -> scalar; the softmax loss has no use for the bias.
ContrastiveFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

CONTRASTIVE = ("softmax", "sigmoid")
CONTRASTIVE_IMPLS = ("sharded", "dense")
WORDS_VOCABS = ("all", "nouns", "nouns_colours")
WORDS_SOFTMAXES = ("all", "vocab", "groups")
TOKEN_LOSSES = ("sparc", "filip", "filip_text", "per_token")


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array) -> jax.Array:
  """Symmetric InfoNCE over the batch: [B, E], [B, E] (L2-normalised), scalar exp(logit_scale) -> scalar."""
  logits = temperature * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T  # [B, B]
  labels = jnp.arange(logits.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return (i2t + t2i) / 2


def hard_negative_loss(image_emb: jax.Array, text_emb: jax.Array, negative_emb: jax.Array, temperature: jax.Array,
                       valid: jax.Array) -> jax.Array:
  """Each image against its caption and that caption's false twin (one object, attribute, relation or count
  changed): -log softmax over the pair, mean over the examples that have a twin.

  [B, E] x3 (L2-normalised), scalar temperature, bool [B] -> scalar. NegCLIP (Yuksekgonul et al. 2023) adds
  such twins to the batch's softmax; scored against its own caption alone, the image must tell apart exactly what
  the two sentences do, which the batch's other captions rarely ask of it. Per example: no device talks to another.

  It trains the image tower alone (the texts' side is a constant): with a gradient into the text tower too, the
  cheapest way down is to make the caption and its twin embed alike, which holds the loss at ln 2 while the image
  learns nothing (a 500-step run of the default config did exactly that).
  """
  x = image_emb.astype(jnp.float32)
  direction = lax.stop_gradient(negative_emb.astype(jnp.float32) - text_emb.astype(jnp.float32))
  margin = temperature * jnp.sum(x * direction, axis=-1)
  weights = valid.astype(jnp.float32)
  return jnp.sum(jax.nn.softplus(margin) * weights) / jnp.maximum(weights.sum(), 1.0)


def twin_text_loss(text_emb: jax.Array, negative_emb: jax.Array, temperature: jax.Array,
                   valid: jax.Array) -> jax.Array:
  """The text tower's side: a caption and its false twin must not embed alike, whatever the image.

  mean over valid examples of softplus(t (cos(caption, twin) - 1)) for [B, E] x2 (L2-normalised), the ITC
  temperature t (not trained by this term) and bool [B]. Trained on the scenes, the text tower otherwise learns to
  ignore the words that name an object's kind (docs/objects.md, "The text tower drops the kind word too").
  """
  cosine = jnp.sum(text_emb.astype(jnp.float32) * negative_emb.astype(jnp.float32), axis=-1)
  weights = valid.astype(jnp.float32)
  apart = jax.nn.softplus(lax.stop_gradient(temperature) * (cosine - 1.0))
  return jnp.sum(apart * weights) / jnp.maximum(weights.sum(), 1.0)


def twin_columns_loss(image_emb: jax.Array, text_emb: jax.Array, negative_emb: jax.Array, temperature: jax.Array,
                      valid: jax.Array) -> jax.Array:
  """NegCLIP's form of the twins (Yuksekgonul et al. 2023): the batch's false twins as extra columns of the image ->
  text softmax, so each image is scored against every caption and every twin of the batch.

  This term is what the extra columns add to each image's cross-entropy, averaged over the images: the log-sum-exp
  of its row over the captions and the valid twins, minus that over the captions alone. ITC + 0.5 * this term is
  NegCLIP's loss ((image -> text over captions and twins + text -> image) / 2). Unlike hard_negative_loss, the
  gradient reaches both towers and every image, through all the batch's twins.
  [B, E] x3 (L2-normalised), scalar temperature, bool [B] (which twins exist) -> scalar. The dense reference of
  `sharded_twin_columns_loss`.
  """
  x = image_emb.astype(jnp.float32)
  captions = temperature * x @ text_emb.astype(jnp.float32).T                                   # [B, B]
  twins = jnp.where(valid[None, :], temperature * x @ negative_emb.astype(jnp.float32).T, -jnp.inf)  # [B, B]
  both = jax.nn.logsumexp(jnp.concatenate([captions, twins], axis=1), axis=1)
  return jnp.mean(both - jax.nn.logsumexp(captions, axis=1))


def sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array, bias: jax.Array) -> jax.Array:
  """SigLIP: -sum log sigmoid(label * (t <x_i, y_j> + b)) / B, label +1 on matching pairs, -1 elsewhere.

  [B, E], [B, E] (L2-normalised), scalar temperature t and bias b -> scalar. The dense reference of
  `ring_sigmoid_loss`: it builds the whole [B, B] logits.
  """
  logits = temperature * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T + bias  # [B, B]
  labels = 2 * jnp.eye(logits.shape[0]) - 1
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


# ------------------------------------------------------------------------------------------------------------------
# The contrastive losses over a mesh: the batch split over sharding.BATCH_AXES, as the train step splits it.
# ------------------------------------------------------------------------------------------------------------------


def _ring_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)


def sharded_softmax_loss(mesh: Mesh) -> ContrastiveFn:
  """`contrastive_loss` with each device computing only its rows of the logits: a [b, B] block, not [B, B].

  Each device gathers the texts ([B, E], small) and scores its own images against all of them. The image ->
  text half is then a softmax along its own rows; the text -> image half needs each column's log-sum-exp,
  which spans every device: reduced across them as [B] vectors (a max, then a sum), never as the matrix.
  """
  axes = sharding.BATCH_AXES
  d = _ring_size(mesh)

  def local(x, y, t):                                  # [b, E], [b, E], scalar
    b = x.shape[0]
    logits = t * x @ lax.all_gather(y, axes, tiled=True).T          # [b, B]: this device's rows
    first = lax.axis_index(axes) * b
    positive = lax.dynamic_slice_in_dim(logits, first, b, axis=1).diagonal()   # [b]
    rows = jax.nn.logsumexp(logits, axis=1)                          # [b]
    # The shift only keeps exp in range; the log-sum-exp's gradient does not depend on it.
    shift = lax.pmax(lax.stop_gradient(logits).max(axis=0), axes)    # [B]
    cols = jnp.log(lax.psum(jnp.exp(logits - shift).sum(axis=0), axes)) + shift   # [B], the same on every device
    return (lax.psum(jnp.sum(rows - 2 * positive), axes) + jnp.sum(cols)) / (2 * b * d)

  def loss(image_emb, text_emb, temperature, bias):
    del bias
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P())(
        image_emb.astype(jnp.float32), text_emb.astype(jnp.float32), temperature.astype(jnp.float32))

  return loss


def ring_sigmoid_loss(mesh: Mesh) -> ContrastiveFn:
  """`sigmoid_loss` around the device ring: no device ever holds more than one [b, b] block of logits.

  Each device keeps its images and scores them against its own texts (the diagonal block, the only one with
  positives), then passes its texts to the next device and scores the ones it receives, D - 1 times (a scan
  over the rounds). The sigmoid loss is a plain sum over pairs, so the blocks need no normalisation across
  devices, only the final sum. The backward pass goes around the ring again, recomputing each block from the
  embeddings (a custom VJP: autodiff of the scan would keep every round's logits): the image gradient
  accumulates in place, the text gradient travels with its texts and one last hop brings it home.
  """
  axes = sharding.BATCH_AXES
  d = _ring_size(mesh)
  hop = lambda x: lax.ppermute(x, axes, [(i, (i + 1) % d) for i in range(d)])  # device i -> i + 1

  def labels(b, diagonal):
    return 2 * jnp.eye(b) - 1 if diagonal else -jnp.ones((b, b))

  def block_loss(x, y, t, bias, diagonal):             # [b, E], [b, E] -> scalar
    z = t * x @ y.T + bias                               # [b, b]
    return -jnp.sum(jax.nn.log_sigmoid(labels(x.shape[0], diagonal) * z))

  def block_grads(x, y, t, bias, diagonal, scale):       # d block_loss * scale / d (x, y, t, bias)
    s = x @ y.T                                          # [b, b]
    label = labels(x.shape[0], diagonal)
    # d(-log sigmoid(label z)) / dz = -label sigmoid(-label z), with z = t s + bias.
    dz = -label * jax.nn.sigmoid(-label * (t * s + bias)) * scale
    return t * dz @ y, t * dz.T @ x, jnp.sum(dz * s), jnp.sum(dz)

  def forward(x, y, t, bias):
    def round_(carry, _):
      y, total = carry
      y = hop(y)
      return (y, total + block_loss(x, y, t, bias, False)), None

    (_, total), _ = lax.scan(round_, (y, block_loss(x, y, t, bias, True)), None, length=d - 1)
    return lax.psum(total, axes) / (x.shape[0] * d)

  def backward(x, y, t, bias, g):
    scale = g / (x.shape[0] * d)
    dx, dy, dt, db = block_grads(x, y, t, bias, True, scale)

    def round_(carry, _):
      y, dy, dx, dt, db = carry
      y, dy = hop(y), hop(dy)                            # dy: the gradient of the texts now held, so far
      gx, gy, gt, gb = block_grads(x, y, t, bias, False, scale)
      return (y, dy + gy, dx + gx, dt + gt, db + gb), None

    (_, dy, dx, dt, db), _ = lax.scan(round_, (y, dy, dx, dt, db), None, length=d - 1)
    return dx, hop(dy), lax.psum(dt, axes), lax.psum(db, axes)

  spec = (P(axes), P(axes), P(), P())
  forward_map = jax.shard_map(forward, mesh=mesh, in_specs=spec, out_specs=P())
  backward_map = jax.shard_map(backward, mesh=mesh, in_specs=spec + (P(),), out_specs=spec)

  @jax.custom_vjp
  def ring(x, y, t, bias):
    return forward_map(x, y, t, bias)

  def ring_fwd(x, y, t, bias):
    return forward_map(x, y, t, bias), (x, y, t, bias)

  def ring_bwd(residuals, g):
    return backward_map(*residuals, g)

  ring.defvjp(ring_fwd, ring_bwd)

  def loss(image_emb, text_emb, temperature, bias):
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return ring(f32(image_emb), f32(text_emb), f32(temperature), f32(bias))

  return loss


def sharded_twin_columns_loss(mesh: Mesh):
  """`twin_columns_loss` with each device computing only its images' rows: [b, B] blocks of captions and of twins
  (each device gathers the texts and the twins, [B, E] each), then one sum across devices."""
  axes = sharding.BATCH_AXES
  d = _ring_size(mesh)

  def local(x, y, n, valid, t):                       # [b, E] x3, bool [b], scalar
    gather = lambda a: lax.all_gather(a, axes, tiled=True)
    # The dense formula on this device's rows: the mean over its b images, then the mean over devices.
    return lax.psum(twin_columns_loss(x, gather(y), gather(n), t, gather(valid)), axes) / d

  def loss(image_emb, text_emb, negative_emb, temperature, valid):
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes),) * 4 + (P(),), out_specs=P())(
        f32(image_emb), f32(text_emb), f32(negative_emb), valid, f32(temperature))

  return loss


def make_contrastive_fn(loss_cfg: ml_collections.ConfigDict, mesh: Optional[Mesh] = None) -> ContrastiveFn:
  """The ITC loss of `loss_cfg`: (image_emb [B, E], text_emb [B, E], temperature, bias) -> scalar.

  Over `mesh` (the batch split over its batch axes) unless loss_cfg.contrastive_impl is 'dense' or no mesh is
  given; then the dense formula, its [B, B] logits laid out as the compiler chooses.
  """
  validate_loss_config(loss_cfg)
  sigmoid = loss_cfg.contrastive == "sigmoid"
  if mesh is None or loss_cfg.contrastive_impl == "dense":
    return sigmoid_loss if sigmoid else lambda x, y, t, bias: contrastive_loss(x, y, t)
  return ring_sigmoid_loss(mesh) if sigmoid else sharded_softmax_loss(mesh)


def contrastive_init(loss_cfg: ml_collections.ConfigDict) -> dict[str, float]:
  """The model's initial log-temperature and bias for this ITC loss: SigLIP's t = 10, b = -10 for 'sigmoid'
  (a start near the loss of predicting every pair negative); the model config's own for 'softmax'."""
  if loss_cfg.contrastive != "sigmoid":
    return {}
  return {"init_logit_scale": math.log(loss_cfg.sigmoid_init_temperature),
          "init_logit_bias": float(loss_cfg.sigmoid_init_bias)}


def next_token_log_probs(logits: jax.Array, text: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """log p(token t + 1 | image, tokens <= t) and which of those tokens are real (not padding).

  logits [B, L - 1, V] (position t predicts token t + 1), text [B, L] -> (float32 [B, L - 1], bool [B, L - 1]).
  """
  labels = text[:, 1:]
  log_probs = -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return log_probs, labels != pad_id


def sequence_log_likelihood(logits: jax.Array, text: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """log p(text | image) summed over each caption's real tokens, and their number: -> (float32 [B], int32 [B])."""
  log_probs, real = next_token_log_probs(logits, text, pad_id)
  return jnp.sum(jnp.where(real, log_probs, 0.0), axis=-1), jnp.sum(real, axis=-1)


def caption_loss(logits: jax.Array, text: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy, mean over real tokens: logits [B, L - 1, V], text [B, L] -> (loss, #tokens)."""
  log_probs, real = next_token_log_probs(logits, text, pad_id)
  weights = real.astype(jnp.float32)
  count = weights.sum()
  return (-log_probs * weights).sum() / jnp.maximum(count, 1.0), count


def caption_words(text: jax.Array, pad_id: int, vocab_size: int, vocab: Optional[jax.Array] = None) -> jax.Array:
  """The words each caption holds, [B, V] 0/1: every real token of text [B, L] after the start token (the end token
  included), each distinct word once; with vocab [V] (0/1), only those words."""
  real = (text != pad_id) & (jnp.arange(text.shape[1]) > 0)[None]
  counts = jnp.zeros((text.shape[0], vocab_size), jnp.float32).at[jnp.arange(text.shape[0])[:, None], text].add(real)
  present = (counts > 0).astype(jnp.float32)
  return present if vocab is None else present * vocab


def words_loss(logits: jax.Array, text: jax.Array, pad_id: int, vocab: Optional[jax.Array] = None,
               softmax_over_vocab: bool = False) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of word_logits [B, V] against the words of each caption in text [B, L] (`caption_words`), which
  share probability 1 (SuperClass, Huang et al. 2024, without its IDF weights). With vocab (0/1) only its words
  count (the caption's nouns name its objects, as CatLIP's labels do) and a caption with none of them adds nothing.
  vocab is [V], or [G, V]: G groups of words (loss.words_softmax='groups'), counted as their union unless
  softmax_over_vocab.
  softmax_over_vocab (loss.words_softmax='vocab' or 'groups'): the softmax runs over vocab's words alone, one per
  group, a classifier over each group's labels as CatLIP's over its own; a caption's loss is the sum of its groups'
  (those it holds a word of). Otherwise every word outside vocab is trained down as well.
  Returns (the mean over the captions that count, how many count)."""
  groups = None if vocab is None else jnp.reshape(vocab, (-1, logits.shape[-1]))   # [G, V]
  present = caption_words(text, pad_id, logits.shape[-1], None if groups is None else groups.max(0))
  total = present.sum(-1)
  count = (total > 0).sum().astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  if not softmax_over_vocab:
    target = present / jnp.maximum(total, 1.0)[:, None]
    per_caption = -jnp.sum(target * jax.nn.log_softmax(logits), -1)
  elif groups is None:
    raise ValueError("words_loss: softmax_over_vocab needs a vocab.")
  else:
    present = present[:, None] * groups[None]                              # [B, G, V]
    target = present / jnp.maximum(present.sum(-1), 1.0)[..., None]
    # Finite outside each group: 0 * log p stays 0 there.
    log_probs = jax.nn.log_softmax(jnp.where(groups[None] > 0, logits[:, None], -1e30))
    per_caption = -jnp.sum(target * log_probs, (-2, -1))
  return per_caption.sum() / jnp.maximum(count, 1.0), count


def token_filip_loss(patch_emb: jax.Array, token_emb: jax.Array, valid: jax.Array,
                     temperature: jax.Array, image_to_text: bool = True) -> jax.Array:
  """FILIP's token-wise contrastive loss (Yao et al. 2022): every caption against every image of the batch.

  patch_emb [B, N, E], token_emb [B, L, E], valid [B, L] -> scalar. Caption b's similarity to image c is the mean
  over its valid tokens of each token's best cosine with c's patches; image c's to caption b, the mean over its
  patches of each patch's best cosine with b's valid tokens. Each is a softmax over the batch at `temperature`
  (captions over images, images over captions), averaged. A token's best patch must be in its own image rather
  than in another's, so a word is pushed onto the patches that tell its image apart, and the position of a
  patch, the same in every image, cannot serve (as it can within one example, token_loss). Its logits are
  [B, B, L, N] (dense; a tiny-scale option).

  image_to_text=False (loss.token_loss='filip_text') keeps the captions-over-images half only. The other half asks
  every patch for its best token in its own caption, the patches of objects the caption does not name included,
  which a caption elsewhere in the batch naming such an object's kind may win; this option tests whether that
  hurts (on the built-in scenes it does not: without that half the words turn away from their objects).
  """
  p = normalize(patch_emb.astype(jnp.float32))
  t = normalize(token_emb.astype(jnp.float32))
  sim = jnp.einsum("ble,cne->bcln", t, p)                                        # caption b, image c
  count = jnp.maximum(valid.sum(-1), 1)[:, None]                                   # [B, 1]
  text_to_image = (sim.max(-1) * valid[:, None]).sum(-1) / count                   # [B, B]
  labels = jnp.arange(sim.shape[0])
  per_text = optax.softmax_cross_entropy_with_integer_labels(temperature * text_to_image, labels)
  if not image_to_text:
    return per_text.mean()
  patch_to_text = jnp.where(valid[:, None, :, None], sim, -jnp.inf).max(2)
  patch_to_text = jnp.where(valid.any(-1)[:, None, None], patch_to_text, 0.0).mean(-1)   # [B, B]
  per_image = optax.softmax_cross_entropy_with_integer_labels(temperature * patch_to_text.T, labels)
  return 0.5 * (per_text.mean() + per_image.mean())


def token_contrast_loss(patch_emb: jax.Array, token_emb: jax.Array, valid: jax.Array, temperature: jax.Array,
                        text: jax.Array, pad_id: int, vocab_size: int) -> jax.Array:
  """Each caption token against the batch's images by its best patch, with the word's own negatives.

  patch_emb [B, N, E], token_emb [B, L, E], valid [B, L], text [B, L] (the word ids) -> scalar. Token l of caption
  b scores image c by its best cosine with c's patches; a softmax over the images at `temperature` must pick b.
  An image whose caption holds the same word is not among the token's negatives: it may well show what the word
  names, and FILIP's form (token_filip_loss), which counts every other image, would push the word off it. A word
  that every caption of the batch holds (the end token, 'a') has no negatives and adds nothing. The loss is the
  mean over the valid tokens that have a negative.
  """
  p = normalize(patch_emb.astype(jnp.float32))
  t = normalize(token_emb.astype(jnp.float32))
  best = temperature * jnp.einsum("ble,cne->blcn", t, p).max(-1)                   # [B, L, B]: token (b, l), image c
  shares = (caption_words(text, pad_id, vocab_size) > 0).T[text]                    # [B, L, B]: caption c holds it
  own = jnp.eye(text.shape[0], dtype=bool)[:, None, :]                              # [B, 1, B]
  logits = jnp.where(own | ~shares, best, -jnp.inf)
  per_token = jax.nn.logsumexp(logits, axis=-1) - jnp.where(own, best, 0.0).sum(-1)   # [B, L]
  counted = valid & jnp.any(~shares & ~own, axis=-1)
  return jnp.where(counted, per_token, 0.0).sum() / jnp.maximum(counted.sum(), 1)


def token_loss(patch_emb: jax.Array, token_emb: jax.Array, valid: jax.Array, temperature: jax.Array) -> jax.Array:
  """SPARC's fine-grained term (Bica et al. 2024): each caption token against the patches it picks, per example.

  patch_emb [B, N, E], token_emb [B, L, E] (the joint-space vectors attentive masking compares), valid [B, L]
  (the tokens that count) -> scalar. For token l: its cosines with the N patches, min-max scaled to [0, 1] over
  the patches; those below 1 / N set to 0 and the rest normalised to sum 1 give the weights a_l; the grouped patch
  embedding c_l = sum_n a_ln p_n. Within the caption, c_l must pick t_l out of the caption's tokens and t_l must
  pick c_l out of the groups (a softmax over the caption's valid tokens each way, at `temperature`). The loss is
  the mean over each caption's valid tokens, then over the batch (a caption without any: 0).

  ITC trains only the pooled embeddings, so nothing asks a caption's words to point at their patches; this term
  trains the very cosines that the paper's mask score takes its max over.
  """
  p = normalize(patch_emb.astype(jnp.float32))
  t = normalize(token_emb.astype(jnp.float32))
  sim = jnp.einsum("ble,bne->bln", t, p)                                         # [B, L, N]
  lo, hi = sim.min(-1, keepdims=True), sim.max(-1, keepdims=True)
  scaled = (sim - lo) / jnp.maximum(hi - lo, 1e-6)
  weights = jnp.where(scaled >= 1.0 / sim.shape[-1], scaled, 0.0)   # the best patch always keeps weight 1
  weights = weights / weights.sum(-1, keepdims=True)
  grouped = normalize(jnp.einsum("bln,bne->ble", weights, p))                     # [B, L, E]
  logits = temperature * jnp.einsum("ble,bke->blk", grouped, t)                   # group l against token k
  pair = valid[:, :, None] & valid[:, None, :]
  logits = jnp.where(pair, logits, -1e9)
  own = jnp.diagonal(logits, axis1=1, axis2=2)                                     # [B, L]
  group_to_token = own - jax.nn.logsumexp(logits, axis=2)
  token_to_group = own - jax.nn.logsumexp(logits, axis=1)
  per_token = -0.5 * (group_to_token + token_to_group) * valid
  return (per_token.sum(-1) / jnp.maximum(valid.sum(-1), 1)).mean()


def words_vocab(name: str, vocab_size: int, grouped: bool = False) -> Optional[np.ndarray]:
  """loss.words_vocab as words_loss's `vocab`: None for 'all'; for 'nouns' a 0/1 [vocab_size] over the built-in
  scenes' nouns (their objects' kinds and the generic 'object', 'shape', 'thing'), in the scenes' word ids; for
  'nouns_colours' over those and the scenes' colour words. grouped (loss.words_softmax='groups'): [G, vocab_size],
  one row per group (the nouns; the colour words)."""
  if name == "all":
    return None
  from sycoca_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  ids = [tokenizers.scenes_noun_ids()]
  if name == "nouns_colours":
    ids.append(tokenizers.scenes_colour_ids())
  mask = np.zeros((len(ids), vocab_size), np.float32)
  for row, group in zip(mask, ids):
    row[list(group)] = 1.0
  return mask if grouped else mask.max(0)


def mim_targets(images: jax.Array, patch_size: int, norm_pix: bool = True) -> jax.Array:
  """[B, H, W, 3] -> [B, N, P] pixel targets, normalised per patch (MAE's norm_pix_loss) when norm_pix.

  The targets are the model's input pixels: uint8 images are normalised first, as the model does (pixels.py).
  """
  target = vit.patchify(pixels.normalize(images).astype(jnp.float32), patch_size)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def mim_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, kind: str = "mse") -> jax.Array:
  """Reconstruction error on hidden patches only: [B, N, P], [B, N, P], mask [B, N] (1 = hidden) -> scalar."""
  diff = pred.astype(jnp.float32) - target
  if kind == "mse":
    per_patch = jnp.square(diff).mean(axis=-1)
  elif kind == "l1":
    per_patch = jnp.abs(diff).mean(axis=-1)
  else:
    raise ValueError(f"config.loss.mim_loss: {kind!r} is not one of 'mse', 'l1'.")
  return (per_patch * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def default_loss_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      itc_weight=1.0, ic_weight=2.0, mim_weight=1.0,   # paper: L = L_ITC + 2 L_IC + L_TM
      norm_pix=True,                                   # TG-MIM targets normalised per patch
      mim_loss="mse",                                  # mse | l1
      contrastive="softmax",                           # softmax (CLIP / CoCa InfoNCE) | sigmoid (SigLIP)
      # sharded: no device holds the [B, B] logits (softmax: its rows; sigmoid: the device ring) | dense: the
      # reference formula, whose [B, B] logits the compiler lays out as it likes.
      contrastive_impl="sharded",
      sigmoid_init_temperature=10.0, sigmoid_init_bias=-10.0,   # SigLIP's start; learned from there
      # Each image against its caption's false twin (hard_negative_loss), for data whose captions come with one
      # (data.scenes.hard_negatives); 0 = off. Needs the ITC head.
      hard_negative_weight=0.0,
      # The text side of the twins (twin_text_loss): caption and twin kept apart in the text tower; 0 = off.
      twin_text_weight=0.0,
      # The twins as extra columns of the image -> text softmax (twin_columns_loss); 0.5 with itc_weight 1 is
      # NegCLIP's loss; 0 = off.
      twin_columns_weight=0.0,
      # The caption's words as the pooled image embedding's multi-label target (words_loss; model.words_head);
      # 0 = off. words_vocab: which words count: 'all' (SuperClass), 'nouns' (the built-in scenes' nouns) or
      # 'nouns_colours' (those and the scenes' colour words).
      # words_softmax: what the head's softmax runs over: 'all' the vocabulary's words, 'vocab' words_vocab's
      # alone (a classifier over those labels, as CatLIP's), or 'groups' one softmax per group of words_vocab (the
      # nouns; the colour words), so that one group's words do not take the other's probability. 'vocab' and
      # 'groups' need words_vocab other than 'all'.
      words_weight=0.0, words_vocab="all", words_softmax="all",
      # > 0: the words weight falls on a cosine from words_weight at step 0 to 0 at this step, and stays 0 after
      # (the head teaches the tower objects early, then leaves the update to the other objectives); 0 = constant.
      words_decay_steps=0,
      # A term on the cosines between the caption's tokens and the patches, the ones the paper's mask score reads
      # (token_loss picks its form); 0 = off.
      token_weight=0.0,
      # Which: 'sparc' (token_loss: each token against its caption's other tokens), 'filip' (token_filip_loss:
      # each caption against the batch's images through its tokens' best patches, and each image against the
      # captions through its patches' best tokens; [B, B, L, N] logits), 'filip_text' (its first half only) or
      # 'per_token' (token_contrast_loss: each token against the batch's images whose captions lack its word).
      token_loss="sparc",
  ))


def validate_loss_config(loss_cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending config.loss key."""
  for key, allowed in (("contrastive", CONTRASTIVE), ("contrastive_impl", CONTRASTIVE_IMPLS),
                       ("token_loss", TOKEN_LOSSES)):
    if loss_cfg[key] not in allowed:
      raise ValueError(f"config.loss.{key}: {loss_cfg[key]!r} is not one of {', '.join(map(repr, allowed))}.")
  if loss_cfg.words_vocab not in WORDS_VOCABS:
    raise ValueError(f"config.loss.words_vocab: {loss_cfg.words_vocab!r} is not one of "
                     f"{', '.join(map(repr, WORDS_VOCABS))}.")
  if loss_cfg.words_softmax not in WORDS_SOFTMAXES:
    raise ValueError(f"config.loss.words_softmax: {loss_cfg.words_softmax!r} is not one of "
                     f"{', '.join(map(repr, WORDS_SOFTMAXES))}.")
  if loss_cfg.words_softmax != "all" and loss_cfg.words_vocab == "all":
    raise ValueError(f"config.loss.words_softmax: {loss_cfg.words_softmax!r} runs the softmax over "
                     "loss.words_vocab's words, and words_vocab='all' is every word; set words_vocab='nouns' or "
                     "words_softmax='all'.")
  if loss_cfg.sigmoid_init_temperature <= 0:
    raise ValueError(f"config.loss.sigmoid_init_temperature: {loss_cfg.sigmoid_init_temperature} must be > 0.")
  if loss_cfg.words_decay_steps < 0:
    raise ValueError(f"config.loss.words_decay_steps: {loss_cfg.words_decay_steps} is negative; 0 keeps the words "
                     "weight constant.")


def enabled_heads(loss_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  validate_loss_config(loss_cfg)
  weights = {"itc": loss_cfg.itc_weight, "ic": loss_cfg.ic_weight, "mim": loss_cfg.mim_weight,
             "words": loss_cfg.words_weight, "token": loss_cfg.token_weight}
  for name, w in weights.items():
    if w < 0:
      raise ValueError(f"config.loss.{name}_weight: {w} is negative; use 0 to switch {name} off.")
  heads = tuple(name for name, w in weights.items() if w > 0)
  if not heads:
    raise ValueError("config.loss: every objective weight is 0; enable at least one of itc, ic, mim, words, token.")
  return heads


# Each objective's named term and the config.loss key of its weight, in the order they are summed.
LOSS_WEIGHTS = {"contrastive_loss": "itc_weight", "caption_loss": "ic_weight", "mim_loss": "mim_weight",
                "words_loss": "words_weight", "token_loss": "token_weight",
                "hard_negative_loss": "hard_negative_weight", "twin_text_loss": "twin_text_weight",
                "twin_columns_loss": "twin_columns_weight"}
# The terms on the captions' false twins: each needs the batch's 'hard_negative' captions.
TWIN_WEIGHTS = ("hard_negative_weight", "twin_text_weight", "twin_columns_weight")


def loss_terms(model: SyCoCa, loss_cfg: ml_collections.ConfigDict, out: dict[str, Any],
               batch: dict[str, jax.Array], heads: tuple[str, ...],
               contrastive: Optional[ContrastiveFn] = None, mesh: Optional[Mesh] = None) -> dict[str, jax.Array]:
  """Named scalars of one forward pass `out` on `batch`.

  The loss terms of `heads` (with 'ic', caption_tokens: how many target tokens are real; with 'words',
  word_captions: how many captions hold a word words_loss counts), the temperature (and
  with the sigmoid loss its bias) and the masking diagnostics. `contrastive`: the ITC loss (make_contrastive_fn),
  needed when 'itc' is in heads; `mesh`: the one the batch is split over, for twin_columns_loss.
  """
  terms: dict[str, jax.Array] = {"temperature": out["logit_scale"]}
  if loss_cfg.contrastive == "sigmoid":
    terms["logit_bias"] = out["logit_bias"]
  # Each term under its own name scope: the compiled step's ops carry it (the AOT tool's breakdown reads it).
  if "itc" in heads:
    with jax.named_scope("contrastive_loss"):
      terms["contrastive_loss"] = contrastive(out["image_embedding"], out["text_embedding"], out["logit_scale"],
                                              out["logit_bias"])
  if "hard_negative_embedding" in out:
    with jax.named_scope("hard_negative_loss"):
      valid = has_twin(batch)
      if loss_cfg.hard_negative_weight > 0:
        terms["hard_negative_loss"] = hard_negative_loss(out["image_embedding"], out["text_embedding"],
                                                         out["hard_negative_embedding"], out["logit_scale"], valid)
      if loss_cfg.twin_text_weight > 0:
        terms["twin_text_loss"] = twin_text_loss(out["text_embedding"], out["hard_negative_embedding"],
                                                 out["logit_scale"], valid)
      if loss_cfg.twin_columns_weight > 0:
        columns = (twin_columns_loss if mesh is None or loss_cfg.contrastive_impl == "dense"
                   else sharded_twin_columns_loss(mesh))
        terms["twin_columns_loss"] = columns(out["image_embedding"], out["text_embedding"],
                                             out["hard_negative_embedding"], out["logit_scale"], valid)
      terms["hard_negatives"] = valid.sum()
  if "ic" in heads:
    with jax.named_scope("caption_loss"):
      terms["caption_loss"], terms["caption_tokens"] = caption_loss(out["caption_logits"], batch["text"],
                                                                    model.pad_id)
  if "words" in heads:
    with jax.named_scope("words_loss"):
      vocab = words_vocab(loss_cfg.words_vocab, out["word_logits"].shape[-1], loss_cfg.words_softmax == "groups")
      terms["words_loss"], terms["word_captions"] = words_loss(out["word_logits"], batch["text"], model.pad_id, vocab,
                                                               loss_cfg.words_softmax != "all")
  if "token" in heads:
    with jax.named_scope("token_loss"):
      # The ITC temperature, held: this term must not set how sharp the contrastive softmax is.
      fn = {"sparc": token_loss, "filip": token_filip_loss,
            "filip_text": functools.partial(token_filip_loss, image_to_text=False),
            "per_token": functools.partial(token_contrast_loss, text=batch["text"], pad_id=model.pad_id,
                                           vocab_size=model.text_encoder.vocab_size)}[loss_cfg.token_loss]
      terms["token_loss"] = fn(out["patch_embeddings"], out["token_embeddings"], out["token_valid"],
                               lax.stop_gradient(out["logit_scale"]))
  if "mim" in heads:
    with jax.named_scope("mim_loss"):
      target = mim_targets(batch["image"], model.image_encoder.patch_size, loss_cfg.norm_pix)
      terms["mim_loss"] = mim_loss(out["mim_pred"], target, out["masks"].mim_mask, loss_cfg.mim_loss)
  if "masks" in out:
    terms.update(masking_diagnostics(out["masks"]))
  return terms


def words_weight(loss_cfg: ml_collections.ConfigDict, step: Optional[jax.Array] = None) -> jax.Array:
  """The words loss's weight at `step` (loss.words_decay_steps); the configured one when step is None."""
  decay = loss_cfg.words_decay_steps
  if not decay or step is None:
    return jnp.float32(loss_cfg.words_weight)
  t = jnp.minimum(jnp.asarray(step, jnp.float32), decay) / decay
  return loss_cfg.words_weight * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def total_loss(terms: dict[str, jax.Array], loss_cfg: ml_collections.ConfigDict,
               step: Optional[jax.Array] = None) -> jax.Array:
  """L = w_itc * contrastive_loss + w_ic * caption_loss + w_mim * mim_loss (+ ...), over the terms present.

  `step`: the train step, for a weight that follows a schedule (words_weight).
  """
  total = jnp.zeros((), jnp.float32)
  for key, weight in LOSS_WEIGHTS.items():
    if key in terms:
      w = words_weight(loss_cfg, step) if weight == "words_weight" else loss_cfg[weight]
      total += w * terms[key]
  return total


def uses_twins(loss_cfg: ml_collections.ConfigDict) -> bool:
  """Whether a term on the captions' false twins is on: the batch then carries 'hard_negative' captions."""
  return max(loss_cfg[key] for key in TWIN_WEIGHTS) > 0


def has_twin(batch: dict[str, jax.Array]) -> jax.Array:
  """bool [B]: which examples have a false twin (a 'hard_negative' row equal to its caption is none)."""
  return jnp.any(batch["hard_negative"] != batch["text"], axis=-1)


def forward(model: SyCoCa, loss_cfg: ml_collections.ConfigDict, params: Any, batch: dict[str, jax.Array],
            rng: jax.Array, heads: tuple[str, ...]) -> dict[str, Any]:
  """The model's outputs for `heads` on `batch`, and with a twin term on (loss_cfg.TWIN_WEIGHTS) the embeddings of
  the batch's false twins of its captions (the text tower run on them too)."""
  out = model.apply({"params": params}, batch["image"], batch["text"], rng=rng, heads=heads)
  if uses_twins(loss_cfg) and "itc" in heads:
    if "hard_negative" not in batch:
      raise ValueError("config.loss: a twin term (hard_negative_weight, twin_text_weight, twin_columns_weight) is "
                       "on, but the batch has no 'hard_negative' captions (data.scenes.hard_negatives).")
    out["hard_negative_embedding"] = model.apply({"params": params}, batch["hard_negative"],
                                                 method=SyCoCa.encode_text)["embedding"]
  return out


def make_loss_fn(model: SyCoCa, loss_cfg: ml_collections.ConfigDict, mesh: Optional[Mesh] = None) -> LossFn:
  """Returns loss_fn(params, batch, rng, step=None) -> (total loss, aux) for use inside one jit.

  batch: {'image': [B, H, W, 3] float, 'text': [B, L] int32}. aux holds every loss term, the temperature and
  masking diagnostics, all scalars (cheap to keep on device until a log step). `mesh`: the one the batch is split
  over, for the contrastive loss (see make_contrastive_fn). `step`: the train step, for scheduled weights.
  """
  heads = enabled_heads(loss_cfg)
  contrastive = make_contrastive_fn(loss_cfg, mesh)

  def loss_fn(params, batch, rng, step=None):
    out = forward(model, loss_cfg, params, batch, rng, heads)
    aux = loss_terms(model, loss_cfg, out, batch, heads, contrastive, mesh)
    aux["loss"] = total_loss(aux, loss_cfg, step)
    if loss_cfg.words_decay_steps and "words" in heads:
      aux["words_weight"] = words_weight(loss_cfg, step)
    return aux["loss"], aux

  return loss_fn


def masking_diagnostics(masks) -> dict[str, jax.Array]:
  """Scalars that show whether the ranking means anything: score spread and kept-vs-dropped margins."""
  scores = masks.scores
  diag = {"mask/score_mean": scores.mean(), "mask/score_std": scores.std(axis=1).mean()}
  if masks.mim_mask is not None:
    hidden = masks.mim_mask
    mean_of = lambda w: (scores * w).sum() / jnp.maximum(w.sum(), 1.0)
    diag["mask/mim_hidden_score"] = mean_of(hidden)
    diag["mask/mim_visible_score"] = mean_of(1.0 - hidden)
  return diag


def make_grad_fn(model: SyCoCa, loss_cfg: ml_collections.ConfigDict, accum_steps: int = 1,
                 mesh: Optional[Mesh] = None):
  """grad_fn(params, batch, rng, step=None) -> (grads, aux), optionally over `accum_steps` micro-batches.

  Accumulation keeps every objective exactly what it is on the whole global batch, contrastive negatives
  included (the gradient-cache method): first the ITC embeddings of all micro-batches are computed without
  gradient and d L_ITC / d embedding (and temperature, bias) is taken over the whole batch, by the same
  contrastive loss as without accumulation (sharded over `mesh`); then each micro-batch back-propagates those
  embedding gradients plus its share of the caption and TG-MIM sums. Costs one extra forward pass of the two
  encoders; activation memory is that of one micro-batch.
  """
  loss_fn = make_loss_fn(model, loss_cfg, mesh)
  if accum_steps == 1:
    def grad_fn(params, batch, rng, step=None):
      (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, step)
      return grads, aux
    return grad_fn

  heads = enabled_heads(loss_cfg)
  contrastive = make_contrastive_fn(loss_cfg, mesh)

  def split(x):
    # Micro-batch a holds examples a, a + A, a + 2A, ...: with the batch split over devices in contiguous
    # blocks, every micro-batch then spans every device (a plain reshape would put each on a few devices).
    return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

  def unsplit(x):
    # [A, B / A, ...] -> [B, ...] in the batch's own order: each device's rows are back where they started.
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])

  def grad_fn(params, batch, rng, step=None):
    micro = jax.tree.map(split, {k: batch[k] for k in ("image", "text", "hard_negative") if k in batch})
    rngs = jax.random.split(rng, accum_steps)
    batch_size = batch["text"].shape[0]
    num_tokens = jnp.maximum((batch["text"][:, 1:] != model.pad_id).sum(), 1).astype(jnp.float32)
    if "words" in heads:
      vocab_size = model.text_decoder.vocab_size
      present = caption_words(batch["text"], model.pad_id, vocab_size, words_vocab(loss_cfg.words_vocab, vocab_size))
      num_word_captions = jnp.maximum((present.sum(-1) > 0).sum(), 1).astype(jnp.float32)
    if "hard_negative" in micro:
      num_twins = jnp.maximum(has_twin(batch).sum(), 1).astype(jnp.float32)
    apply = lambda method, *a: model.apply({"params": params}, *a, method=method)

    aux: dict[str, jax.Array] = {}
    g_img = g_txt = jnp.zeros((accum_steps, batch_size // accum_steps, 1))
    g_temp = g_bias = jnp.zeros(())
    if "itc" in heads:
      img, txt = jax.lax.map(lambda mb: (apply(SyCoCa.encode_image, mb["image"])["embedding"],
                                         apply(SyCoCa.encode_text, mb["text"])["embedding"]), micro)
      temperature, bias = apply(SyCoCa.temperature), apply(SyCoCa.bias)
      itc, (g_img, g_txt, g_temp, g_bias) = jax.value_and_grad(contrastive, argnums=(0, 1, 2, 3))(
          unsplit(img), unsplit(txt), temperature, bias)
      g_img, g_txt = split(g_img), split(g_txt)
      aux["contrastive_loss"] = itc

    def micro_grads(acc, xs):
      mb, r, gi, gt = xs

      def surrogate(p):
        out = forward(model, loss_cfg, p, mb, r, heads)
        # ITC was taken on the whole batch above; the other terms are this micro-batch's share of the batch's
        # means (the caption loss: of its mean over all the batch's real tokens).
        terms = loss_terms(model, loss_cfg, out, mb, tuple(h for h in heads if h != "itc"))
        count, twins = terms.pop("caption_tokens", None), terms.pop("hard_negatives", None)
        word_captions = terms.pop("word_captions", None)
        parts = {k: v / accum_steps for k, v in terms.items()}
        if "ic" in heads:
          parts["caption_loss"] = terms["caption_loss"] * count / num_tokens
        if "words" in heads:  # a share of the mean over the batch's captions that count
          parts["words_loss"] = terms["words_loss"] * word_captions / num_word_captions
        for key in ("hard_negative_loss", "twin_text_loss"):  # likewise: shares of means over the batch's twins
          if key in terms:
            parts[key] = terms[key] * twins / num_twins
        weighted = dict(parts)
        if "itc" in heads:
          # Its gradient reaches the parameters through the embeddings', computed above.
          weighted["contrastive_loss"] = ((out["image_embedding"] * gi).sum() + (out["text_embedding"] * gt).sum()
                                          + (g_temp * out["logit_scale"] + g_bias * out["logit_bias"]) / accum_steps)
        return total_loss(weighted, loss_cfg, step), parts

      grads, parts = jax.grad(surrogate, has_aux=True)(params)
      return jax.tree.map(jnp.add, acc, grads), parts

    grads, parts = jax.lax.scan(micro_grads, jax.tree.map(jnp.zeros_like, params), (micro, rngs, g_img, g_txt))
    aux.update({k: v.sum() for k, v in parts.items()})
    aux["loss"] = total_loss(aux, loss_cfg, step)
    if "ic" in heads:
      aux["caption_tokens"] = num_tokens
    if "words" in heads:
      aux["word_captions"] = num_word_captions
      if loss_cfg.words_decay_steps:
        aux["words_weight"] = words_weight(loss_cfg, step)
    return grads, aux

  return grad_fn
