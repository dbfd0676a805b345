"""Mask quality on the built-in scenes: does the IC patch set hold the objects the caption names?

Attentive masking (DESIGN.md 1.2) keeps for the captioner the patches most similar to the caption's tokens and
hides the same ones from TG-MIM. The scenes generator knows the pixels of every object (per-patch coverage,
`scenes.patch_masks`) and a caption's mentions say which objects it names (`captioning.mentioned_objects`),
so whether the ranking finds the caption's objects can be measured, not guessed from pictures.

Shape legend: N scenes, C captions per scene, P patches, K patches kept for IC.

For every (test scene, caption) pair the patches are ranked by the model's own masking code
(`SyCoCa.choose_masks`, the call the training forward pass makes) on a copy of the model whose strategy is
`attentive`, and again on a copy whose strategy is `random` (the baseline). Every variant is scored the same
way, whatever it trains with: CLIP and CoCa (strategy none) and TG-MIM with random masking still have patch and
token projections to rank with, so their numbers say what attentive masking *would* pick from their features.
Ratios: the eval config's if set, else the model's, else 0.5 (CLIP / CoCa mask nothing).

Areas are coverage-weighted: a patch counts by the fraction of its pixels that belong to a named object, so no
threshold decides what an object patch is. Captions that name no object drawn in the scene ("four things")
are left out.

Metrics (prefix 'masking' by default), means over the (scene, caption) pairs:
  ic_object_recall            share of the named objects' area inside the IC set (attentive ranking)
  ic_object_recall_random     the same with random masking (expected: ic_keep_fraction)
  ic_object_precision         mean named-object coverage of the IC patches (attentive)
  ic_object_precision_random  the same with random masking (expected: object_fraction)
  ic_scene_object_recall      share of *every* object's area inside the IC set (attentive): finds objects at
                              all, as opposed to the caption's ones
  ic_object_recall_other_caption   the caption's objects' share inside the IC set that *another scene's* caption
                              chose (attentive, on this image): equal to ic_object_recall when the ranking ignores
                              the caption; the caption's own guidance is the difference
  mim_object_hidden           share of the named objects' area that TG-MIM must rebuild (attentive)
  mim_object_hidden_random    the same with random masking (expected: mim_ratio)
  object_fraction             mean named-object coverage over all patches
  ic_keep_fraction            K / P, the IC set's share of the patches
  num_pairs                   (scene, caption) pairs counted

Config (config.evals.<name>, type='masking'):
  split          scenes split ('test'; 'val' to tune on; 'test_comp' for held-out colour-shape pairs)
  max_examples   the first n scenes (0: all)
  batch_size     global batch of scenes (each with its C captions)
  ic_ratio, mim_ratio   the cut (0: the model's, else 0.5 for IC and the IC ratio for TG-MIM)
  seed           of the random baseline
  cache_images, prefix, data (overrides of config.data; must stay the built-in scenes)
Needs per-patch tokens (model.vision.pool='tok'); with attentional pooling `run` returns nothing and says why.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sycoca_jax import evaluators
from sycoca_jax.data import pipeline
from sycoca_jax.data import scenes as scenes_lib
from sycoca_jax.data import tokenizer_from_config
from sycoca_jax.evaluators import captioning
from sycoca_jax.evaluators import common
from sycoca_jax.models.sycoca import SyCoCa

# ------------------------------------------------------------------------------------------------ metrics


def indicator(ids: np.ndarray, num_patches: int) -> np.ndarray:
  """Patch index sets [..., K] -> bool [..., P], True where a patch is in the set."""
  ids = np.asarray(ids)
  out = np.zeros(ids.shape[:-1] + (num_patches,), bool)
  np.put_along_axis(out, ids, True, axis=-1)
  return out


def area_recall(chosen: np.ndarray, coverage: np.ndarray) -> np.ndarray:
  """Share of the covered area that lies in chosen patches: bool [..., P], float [..., P] -> [...] (NaN: none)."""
  total = coverage.sum(-1)
  inside = np.where(chosen, coverage, 0.0).sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def area_precision(chosen: np.ndarray, coverage: np.ndarray) -> np.ndarray:
  """Mean coverage of the chosen patches: bool [..., P], float [..., P] -> [...]."""
  return np.where(chosen, coverage, 0.0).sum(-1) / np.maximum(chosen.sum(-1), 1)


def mask_quality(ic_keep: np.ndarray, coverage: np.ndarray, *, mim_mask: np.ndarray | None = None,
                 scene_coverage: np.ndarray | None = None, valid: np.ndarray | None = None) -> dict[str, float]:
  """Mask-quality means over pairs (module docstring), from arrays.

  ic_keep [M, K] int patch ids kept for IC; coverage [M, P] the caption's objects' coverage of each patch;
  mim_mask [M, P] 1 where TG-MIM hides a patch; scene_coverage [M, P] every object's coverage; valid [M] pairs
  to count (pairs whose caption names no drawn object are left out in any case).
  """
  coverage = np.asarray(coverage, np.float64)
  num_patches = coverage.shape[-1]
  keep = indicator(ic_keep, num_patches)
  counted = coverage.sum(-1) > 0
  if valid is not None:
    counted &= np.asarray(valid, bool)
  mean = lambda x: float(np.mean(x[counted])) if counted.any() else float("nan")
  out = {
      "ic_object_recall": mean(area_recall(keep, coverage)),
      "ic_object_precision": mean(area_precision(keep, coverage)),
      "object_fraction": mean(coverage.mean(-1)),
      "ic_keep_fraction": ic_keep.shape[-1] / num_patches,
      "num_pairs": float(counted.sum()),
  }
  if scene_coverage is not None:
    out["ic_scene_object_recall"] = mean(area_recall(keep, np.asarray(scene_coverage, np.float64)))
  if mim_mask is not None:
    out["mim_object_hidden"] = mean(area_recall(np.asarray(mim_mask) > 0.5, coverage))
  return out


# ------------------------------------------------------------------------------------------------ model


def _pair_masks(module: SyCoCa, images, texts, rng):
  """The masks training would choose for each caption of each image: images [B, S, S, 3], texts [B, C, L]."""
  b, c, length = texts.shape
  flat = texts.reshape(b * c, length)
  patches = module.encode_image(images)["patch_embeddings"]                   # [B, P, E], once per image
  image_out = {"patch_embeddings": jnp.repeat(patches, c, axis=0)}            # [B * C, P, E]
  masks = module.choose_masks(rng, image_out, module.encode_text(flat), flat)
  return {"ic_keep": masks.ic_keep.reshape(b, c, -1), "mim_mask": masks.mim_mask.reshape(b, c, -1)}


def default_config() -> ml_collections.ConfigDict:
  return evaluators.eval_config("masking", split="test", max_examples=200, batch_size=64, ic_ratio=0.0,
                                mim_ratio=0.0, seed=0, cache_images=True)


def resolve_ratios(model: SyCoCa, cfg: ml_collections.ConfigDict) -> tuple[float, float]:
  """(IC ratio, TG-MIM ratio) to cut at: the eval config's, else the model's, else 0.5 and the IC ratio."""
  ic = cfg.ic_ratio or model.ic_ratio or 0.5
  mim = cfg.mim_ratio or model.mim_ratio or ic
  for key, r in (("ic_ratio", ic), ("mim_ratio", mim)):
    if not 0.0 < r < 1.0:
      raise ValueError(f"evals.masking.{key}={r}: must be in (0, 1).")
  return float(ic), float(mim)


@evaluators.register("masking", default_config)
class MaskQuality:
  """Attentive vs random masking against the objects each test caption names (module docstring)."""

  def __init__(self, model: SyCoCa, cfg: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
               prefix: str):
    self.model, self.cfg, self.prefix, self.data_config = model, cfg, prefix, data_config
    if data_config.name != "scenes":
      raise ValueError(f"evals.{self.prefix}: mask quality needs the built-in scenes (data.name='scenes'), which "
                       f"know each object's pixels; got {data_config.name!r}.")
    self.enabled = model.image_encoder.pool != "attn"
    if not self.enabled:
      logging.warning("evals.%s: model.vision.pool=%r has no per-patch tokens to rank; mask quality is skipped.",
                      self.prefix, model.image_encoder.pool)
    self.ic_ratio, self.mim_ratio = resolve_ratios(model, cfg)

    split = pipeline.load_eval_split(data_config, cfg.split, cfg.max_examples)
    self.num_images = len(split)
    self.batch_size = common.round_batch_size(cfg.batch_size)
    self.images = common.CachedSplitImages(split, self.batch_size, cache=cfg.cache_images)
    self.texts, self.coverage, self.scene_coverage, self.pair_valid = self._pairs(split)
    # Scene i's image ranked by scene i - 1's captions: what the ranking finds without its caption's guidance.
    self.other_texts = np.roll(self.texts, 1, axis=0)

    scorer = model.clone(masking="attentive", ic_ratio=self.ic_ratio, mim_ratio=self.mim_ratio)
    randomiser = model.clone(masking="random", ic_ratio=self.ic_ratio, mim_ratio=self.mim_ratio)

    def both(params, images, texts, other_texts, rng):
      attentive = scorer.apply({"params": params}, images, texts, rng, method=_pair_masks)
      baseline = randomiser.apply({"params": params}, images, texts, rng, method=_pair_masks)
      other = scorer.apply({"params": params}, images, other_texts, rng, method=_pair_masks)
      return attentive | {f"{k}_random": v for k, v in baseline.items()} | {"ic_keep_other": other["ic_keep"]}

    self._masks_fn = jax.jit(both)

  def _pairs(self, split):
    """Tokenised captions [N, C, L], named-object coverage [N, C, P], all-object coverage [N, P], valid [N, C]."""
    tokenizer = tokenizer_from_config(self.data_config)
    patch_size, size = self.model.image_encoder.patch_size, self.data_config.image_size
    num_captions = max(len(c) for c in split.captions)
    n, num_patches = len(split), (size // patch_size) ** 2
    texts = np.zeros((n, num_captions, tokenizer.max_len), np.int32)
    coverage = np.zeros((n, num_captions, num_patches), np.float32)
    scene_coverage = np.zeros((n, num_patches), np.float32)
    valid = np.zeros((n, num_captions), bool)
    for i, (captions, graph) in enumerate(zip(split.captions, split.scene_graphs)):
      _, pixel_masks = scenes_lib.render_scene(split.source.scene(i), size, with_masks=True)
      objects = scenes_lib.patch_masks(pixel_masks, patch_size).reshape(len(pixel_masks), num_patches)  # [K, P]
      scene_coverage[i] = np.clip(objects.sum(0), 0.0, 1.0)
      texts[i, : len(captions)] = tokenizer.encode(list(captions))
      for c, caption in enumerate(captions):
        named = captioning.mentioned_objects(caption, graph)
        if named:
          coverage[i, c] = np.clip(objects[named].sum(0), 0.0, 1.0)
          valid[i, c] = True
    return texts, coverage, scene_coverage, valid

  def run(self, params) -> dict[str, float]:
    if not self.enabled:
      return {}
    key = jax.random.PRNGKey(self.cfg.seed)
    calls = iter(range(1 << 30))

    def fn(batch):  # a fresh random draw per batch, the same in every run
      return self._masks_fn(params, batch["image"], batch["texts"], batch["other_texts"],
                            jax.random.fold_in(key, next(calls)))

    batches = self.images.iterate({"texts": self.texts, "other_texts": self.other_texts},
                                  common.data_sharding(params))
    out = common.collect(fn, batches, self.num_images)
    valid = self.pair_valid & out["valid"][:, None]
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    scene = np.repeat(self.scene_coverage[:, None], self.pair_valid.shape[1], axis=1)
    attentive = mask_quality(flat(out["ic_keep"]), flat(self.coverage), mim_mask=flat(out["mim_mask"]),
                             scene_coverage=flat(scene), valid=flat(valid))
    baseline = mask_quality(flat(out["ic_keep_random"]), flat(self.coverage), mim_mask=flat(out["mim_mask_random"]),
                          valid=flat(valid))
    metrics = dict(attentive)
    other = mask_quality(flat(out["ic_keep_other"]), flat(self.coverage), valid=flat(valid))
    metrics["ic_object_recall_other_caption"] = other["ic_object_recall"]
    for k in ("ic_object_recall", "ic_object_precision", "mim_object_hidden"):
      metrics[f"{k}_random"] = baseline[k]
    return {f"{self.prefix}/{k}": float(v) for k, v in sorted(metrics.items())}
