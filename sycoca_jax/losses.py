"""The three SyCoCa objectives and the one loss function the train step differentiates.

Shape legend: B batch (the global batch: under jit the arrays are global, so the contrastive loss sees every
device's examples as negatives without any explicit all-gather), L text tokens, V vocabulary, N patches,
P pixels per patch, E joint embedding.

  L = w_itc * L_ITC + w_ic * L_IC + w_mim * L_TG-MIM        (paper: 1, 2, 1)

A weight of 0 switches that objective off, and its head is not even run. The captioner's next-token
log-likelihood (`sequence_log_likelihood`) is the one that evaluation and inference score captions with.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sycoca_jax import pixels
from sycoca_jax.models import vit
from sycoca_jax.models.sycoca import SyCoCa

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array) -> jax.Array:
  """Symmetric InfoNCE over the batch: [B, E], [B, E] (L2-normalised), scalar exp(logit_scale) -> scalar."""
  logits = temperature * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T  # [B, B]
  labels = jnp.arange(logits.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return (i2t + t2i) / 2


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
  ))


def enabled_heads(loss_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  weights = {"itc": loss_cfg.itc_weight, "ic": loss_cfg.ic_weight, "mim": loss_cfg.mim_weight}
  for name, w in weights.items():
    if w < 0:
      raise ValueError(f"config.loss.{name}_weight: {w} is negative; use 0 to switch {name} off.")
  heads = tuple(name for name, w in weights.items() if w > 0)
  if not heads:
    raise ValueError("config.loss: every objective weight is 0; enable at least one of itc, ic, mim.")
  return heads


# Each objective's named term and the config.loss key of its weight, in the order they are summed.
LOSS_WEIGHTS = {"contrastive_loss": "itc_weight", "caption_loss": "ic_weight", "mim_loss": "mim_weight"}


def loss_terms(model: SyCoCa, loss_cfg: ml_collections.ConfigDict, out: dict[str, Any],
               batch: dict[str, jax.Array], heads: tuple[str, ...]) -> dict[str, jax.Array]:
  """Named scalars of one forward pass `out` on `batch`.

  The loss terms of `heads` (with 'ic', caption_tokens: how many target tokens are real), the temperature and
  the masking diagnostics.
  """
  terms: dict[str, jax.Array] = {"temperature": out["logit_scale"]}
  if "itc" in heads:
    terms["contrastive_loss"] = contrastive_loss(out["image_embedding"], out["text_embedding"], out["logit_scale"])
  if "ic" in heads:
    terms["caption_loss"], terms["caption_tokens"] = caption_loss(out["caption_logits"], batch["text"], model.pad_id)
  if "mim" in heads:
    target = mim_targets(batch["image"], model.image_encoder.patch_size, loss_cfg.norm_pix)
    terms["mim_loss"] = mim_loss(out["mim_pred"], target, out["masks"].mim_mask, loss_cfg.mim_loss)
  if "masks" in out:
    terms.update(masking_diagnostics(out["masks"]))
  return terms


def total_loss(terms: dict[str, jax.Array], loss_cfg: ml_collections.ConfigDict) -> jax.Array:
  """L = w_itc * contrastive_loss + w_ic * caption_loss + w_mim * mim_loss, over the terms present."""
  total = jnp.zeros((), jnp.float32)
  for key, weight in LOSS_WEIGHTS.items():
    if key in terms:
      total += loss_cfg[weight] * terms[key]
  return total


def make_loss_fn(model: SyCoCa, loss_cfg: ml_collections.ConfigDict) -> LossFn:
  """Returns loss_fn(params, batch, rng) -> (total loss, aux) for use inside one jit.

  batch: {'image': [B, H, W, 3] float, 'text': [B, L] int32}. aux holds every loss term, the temperature and
  masking diagnostics, all scalars (cheap to keep on device until a log step).
  """
  heads = enabled_heads(loss_cfg)

  def loss_fn(params, batch, rng):
    out = model.apply({"params": params}, batch["image"], batch["text"], rng=rng, heads=heads)
    aux = loss_terms(model, loss_cfg, out, batch, heads)
    aux["loss"] = total_loss(aux, loss_cfg)
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


def make_grad_fn(model: SyCoCa, loss_cfg: ml_collections.ConfigDict, accum_steps: int = 1):
  """grad_fn(params, batch, rng) -> (grads, aux), optionally over `accum_steps` micro-batches.

  Accumulation keeps every objective exactly what it is on the whole global batch, contrastive negatives
  included (the gradient-cache method): first the ITC embeddings of all micro-batches are computed without
  gradient and d L_ITC / d embedding is taken on the full [B, B] similarity matrix; then each micro-batch
  back-propagates those embedding gradients plus its share of the caption and TG-MIM sums. Costs one extra
  forward pass of the two encoders; activation memory is that of one micro-batch.
  """
  loss_fn = make_loss_fn(model, loss_cfg)
  if accum_steps == 1:
    def grad_fn(params, batch, rng):
      (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
      return grads, aux
    return grad_fn

  heads = enabled_heads(loss_cfg)

  def split(x):
    # Micro-batch a holds examples a, a + A, a + 2A, ...: with the batch split over devices in contiguous
    # blocks, every micro-batch then spans every device (a plain reshape would put each on a few devices).
    return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

  def grad_fn(params, batch, rng):
    micro = jax.tree.map(split, {"image": batch["image"], "text": batch["text"]})
    rngs = jax.random.split(rng, accum_steps)
    batch_size = batch["text"].shape[0]
    num_tokens = jnp.maximum((batch["text"][:, 1:] != model.pad_id).sum(), 1).astype(jnp.float32)
    apply = lambda method, *a: model.apply({"params": params}, *a, method=method)

    aux: dict[str, jax.Array] = {}
    g_img = g_txt = jnp.zeros((accum_steps, batch_size // accum_steps, 1))
    g_temp = jnp.zeros(())
    if "itc" in heads:
      img, txt = jax.lax.map(lambda mb: (apply(SyCoCa.encode_image, mb["image"])["embedding"],
                                         apply(SyCoCa.encode_text, mb["text"])["embedding"]), micro)
      temperature = apply(SyCoCa.temperature)
      flat = lambda x: x.reshape(batch_size, -1)
      itc, (g_img, g_txt, g_temp) = jax.value_and_grad(contrastive_loss, argnums=(0, 1, 2))(
          flat(img), flat(txt), temperature)
      g_img, g_txt = g_img.reshape(img.shape), g_txt.reshape(txt.shape)
      aux["contrastive_loss"] = itc

    def micro_grads(acc, xs):
      mb, r, gi, gt = xs

      def surrogate(p):
        out = model.apply({"params": p}, mb["image"], mb["text"], rng=r, heads=heads)
        # ITC was taken on the whole batch above; the other terms are this micro-batch's share of the batch's
        # means (the caption loss: of its mean over all the batch's real tokens).
        terms = loss_terms(model, loss_cfg, out, mb, tuple(h for h in heads if h != "itc"))
        count = terms.pop("caption_tokens", None)
        parts = {k: v / accum_steps for k, v in terms.items()}
        if "ic" in heads:
          parts["caption_loss"] = terms["caption_loss"] * count / num_tokens
        weighted = dict(parts)
        if "itc" in heads:
          # Its gradient reaches the parameters through the embeddings', computed above.
          weighted["contrastive_loss"] = ((out["image_embedding"] * gi).sum() + (out["text_embedding"] * gt).sum()
                                          + g_temp * out["logit_scale"] / accum_steps)
        return total_loss(weighted, loss_cfg), parts

      grads, parts = jax.grad(surrogate, has_aux=True)(params)
      return jax.tree.map(jnp.add, acc, grads), parts

    grads, parts = jax.lax.scan(micro_grads, jax.tree.map(jnp.zeros_like, params), (micro, rngs, g_img, g_txt))
    aux.update({k: v.sum() for k, v in parts.items()})
    aux["loss"] = total_loss(aux, loss_cfg)
    if "ic" in heads:
      aux["caption_tokens"] = num_tokens
    return grads, aux

  return grad_fn
