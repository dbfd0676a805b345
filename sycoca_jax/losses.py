"""The three SyCoCa objectives and the one loss function the train step differentiates.

Shape legend: B batch (the global batch: under jit the arrays are global, so the contrastive loss sees every
device's examples as negatives without any explicit all-gather), L text tokens, V vocabulary, N patches,
P pixels per patch, E joint embedding.

  L = w_itc * L_ITC + w_ic * L_IC + w_mim * L_TG-MIM        (paper: 1, 2, 1)

A weight of 0 switches that objective off, and its head is not even run.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

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


def caption_loss(logits: jax.Array, text: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy, mean over real tokens: logits [B, L - 1, V], text [B, L] -> (loss, #tokens)."""
  labels = text[:, 1:]
  weights = (labels != pad_id).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  count = weights.sum()
  return (ce * weights).sum() / jnp.maximum(count, 1.0), count


def mim_targets(images: jax.Array, patch_size: int, norm_pix: bool = True) -> jax.Array:
  """[B, H, W, 3] -> [B, N, P] pixel targets, normalised per patch (MAE's norm_pix_loss) when norm_pix."""
  target = vit.patchify(images.astype(jnp.float32), patch_size)
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


def make_loss_fn(model: SyCoCa, loss_cfg: ml_collections.ConfigDict) -> LossFn:
  """Returns loss_fn(params, batch, rng) -> (total loss, aux) for use inside one jit.

  batch: {'image': [B, H, W, 3] float, 'text': [B, L] int32}. aux holds every loss term, the temperature and
  masking diagnostics, all scalars (cheap to keep on device until a log step).
  """
  heads = enabled_heads(loss_cfg)

  def loss_fn(params, batch, rng):
    out = model.apply({"params": params}, batch["image"], batch["text"], rng=rng, heads=heads)
    aux: dict[str, jax.Array] = {"temperature": out["logit_scale"]}
    total = jnp.zeros((), jnp.float32)
    if "itc" in heads:
      aux["contrastive_loss"] = contrastive_loss(out["image_embedding"], out["text_embedding"], out["logit_scale"])
      total += loss_cfg.itc_weight * aux["contrastive_loss"]
    if "ic" in heads:
      aux["caption_loss"], aux["caption_tokens"] = caption_loss(
          out["caption_logits"], batch["text"], model.pad_id)
      total += loss_cfg.ic_weight * aux["caption_loss"]
    if "mim" in heads:
      masks = out["masks"]
      target = mim_targets(batch["image"], model.image_encoder.patch_size, loss_cfg.norm_pix)
      aux["mim_loss"] = mim_loss(out["mim_pred"], target, masks.mim_mask, loss_cfg.mim_loss)
      total += loss_cfg.mim_weight * aux["mim_loss"]
    if "masks" in out:
      aux.update(masking_diagnostics(out["masks"]))
    aux["loss"] = total
    return total, aux

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
