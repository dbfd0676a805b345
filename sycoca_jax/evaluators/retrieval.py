"""Zero-shot image-text retrieval (R@1/5/10 both ways, mean recalls) and fine-grained caption discrimination.

Shape legend: N images, M captions (several per image), E joint embedding, K negative kinds, L text tokens.

Retrieval, with several captions per image (5 for COCO / Flickr30k Karpathy test and the scenes test split):
  image -> text (TR)  an image's hit at k: *any* of its captions is among the k most similar captions
  text -> image (IR)  a caption's hit at k: its image is among the k most similar images
  mTR / mIR           mean of R@1, R@5, R@10 of each direction (the paper's "mean recall"); rsum all six.
Ties are scored against the model (an equally similar wrong candidate ranks first), so a degenerate model
whose embeddings are all equal gets R@1 ~ 0, not 1.

Fine-grained (built-in scenes only; the scene graph makes it possible): for each test image and each kind in
(attribute, object, relation, count), a true caption and the same caption with one thing of that kind
changed and checked false (data.scenes.negative_caption). Accuracy = how often the true caption scores
higher, scored two ways: ITC cosine similarity, and caption likelihood (sum of log p(token | image, prefix)
from the multimodal decoder). Ties count one half; chance is 0.5.

Metric functions (`retrieval_ranks`, `recall_metrics`, `pairwise_accuracy`) take arrays, not models, so they
are tested on analytic embeddings. `Retrieval` runs the model; the caption likelihood is
losses.sequence_log_likelihood.

Config (config.evals.<name>, type='retrieval'):
  split          eval split name ('test' for scenes, COCO / Flickr30k Karpathy 'test' via coco_json or tfds)
  data           optional overrides of config.data (e.g. name='coco_json', path=..., image_dir=...)
  batch_size     global eval batch (rounded up to a multiple of the device count)
  max_examples   evaluate on the first n images only (0: all)
  ks             recall cut-offs
  fine_grained   run the negatives check (scenes only)
  fine_grained_kinds, fine_grained_seed
  caption_tokens 'all' (the captioner sees every patch token, as in generation) or 'masked' (the patches
                 the model's IC masking would keep for that caption, as in training)
  cache_images   keep decoded images in host memory between runs
  prefix         metric-name prefix (default 'retrieval'), e.g. 'retrieval_coco'
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sycoca_jax import evaluators
from sycoca_jax import losses
from sycoca_jax.data import pipeline
from sycoca_jax.data import scenes as scenes_lib
from sycoca_jax.data import tokenizer_from_config
from sycoca_jax.evaluators import common
from sycoca_jax.models import layers
from sycoca_jax.models.sycoca import SyCoCa

# ------------------------------------------------------------------------------------------------ metrics

MISS = np.iinfo(np.int64).max  # the rank of an image that has no caption to find


def retrieval_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                    chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """0-based ranks of the first correct answer: (i2t [N], t2i [M]).

  image_emb [N, E], text_emb [M, E] (similarity = dot product: pass normalised embeddings for cosine),
  text_image int [M]: the image each caption describes. An image without captions gets rank MISS (a miss at every k).
  i2t rank of image i = number of *wrong* captions at least as similar as its best correct caption.
  t2i rank of caption j = number of wrong images at least as similar as its own image.
  Works in row chunks so COCO-sized galleries (5k x 25k) never build the whole similarity matrix at once.
  """
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  text_image = np.asarray(text_image)
  n, m = len(image_emb), len(text_emb)
  i2t = np.empty(n, np.int64)
  for s in range(0, n, chunk):
    sim = image_emb[s:s + chunk] @ text_emb.T                             # [n', M]
    correct = text_image[None, :] == np.arange(s, s + len(sim))[:, None]  # [n', M]
    best = np.where(correct, sim, -np.inf).max(axis=1)                    # [n']
    rank = ((sim >= best[:, None]) & ~correct).sum(axis=1)
    i2t[s:s + chunk] = np.where(np.isfinite(best), rank, MISS)
  t2i = np.empty(m, np.int64)
  for s in range(0, m, chunk):
    sim = text_emb[s:s + chunk] @ image_emb.T                             # [m', N]
    own = sim[np.arange(len(sim)), text_image[s:s + chunk]]               # [m']
    t2i[s:s + chunk] = (sim >= own[:, None]).sum(axis=1) - 1              # itself is >= itself
  return i2t, t2i


def recall_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                   ks=(1, 5, 10)) -> dict[str, float]:
  """{'i2t_r1', ..., 't2i_r1', ..., 'mTR', 'mIR', 'rsum'}: fractions in [0, 1] (see retrieval_ranks)."""
  i2t, t2i = retrieval_ranks(image_emb, text_emb, text_image)
  out = {}
  for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
    for k in ks:
      out[f"{direction}_r{k}"] = float(np.mean(ranks < k))
  out["mTR"] = float(np.mean([out[f"i2t_r{k}"] for k in ks]))
  out["mIR"] = float(np.mean([out[f"t2i_r{k}"] for k in ks]))
  out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks))
  return out


def pairwise_accuracy(positive: np.ndarray, negative: np.ndarray, valid: np.ndarray | None = None) -> float:
  """Fraction of pairs where the positive scores higher (ties: one half). NaN when no pair is valid."""
  positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
  valid = np.ones(positive.shape, bool) if valid is None else np.asarray(valid, bool)
  if not valid.any():
    return float("nan")
  score = (positive > negative) + 0.5 * (positive == negative)
  return float(score[valid].mean())


# ------------------------------------------------------------------------------------------------ negatives


def fine_grained_pairs(source, tokenizer, kinds=scenes_lib.NEGATIVE_KINDS,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Tokenised (true, false) caption pairs for every scene of a scenes source.

  Returns texts int32 [N, K, 2, L] ([..., 0, :] true, [..., 1, :] false) and valid bool [N, K] (False where a
  scene can not support a kind, e.g. a relation in a one-object scene).
  """
  n = len(source)
  texts = np.zeros((n, len(kinds), 2, tokenizer.max_len), np.int32)
  valid = np.zeros((n, len(kinds)), bool)
  for i in range(n):
    scene = source.scene(i)
    for k, kind in enumerate(kinds):
      rng = np.random.default_rng([seed, i, k])
      pair = scenes_lib.negative_caption(scene, kind, rng)
      if pair is not None:
        texts[i, k] = tokenizer.encode(list(pair))
        valid[i, k] = not np.array_equal(texts[i, k, 0], texts[i, k, 1])  # same ids: not a test
  return texts, valid


# ------------------------------------------------------------------------------------------------ model


def _image_pass(module: SyCoCa, images, texts=None, *, caption_tokens: str = "all"):
  """Image embeddings, and with texts [B, K, 2, L] the ITC / likelihood scores of each text for its image."""
  image_out = module.encode_image(images)
  out = {"embedding": image_out["embedding"]}
  if texts is None:
    return out
  b, k, two, length = texts.shape
  flat = texts.reshape(b * k * two, length)
  text_out = module.encode_text(flat)
  text_emb = text_out["embedding"].reshape(b, k * two, -1)
  out["itc"] = jnp.einsum("be,bte->bt", image_out["embedding"], text_emb).reshape(b, k, two)

  def repeat(x):  # [B, ...] -> [B * K * 2, ...], each image once per text
    return jnp.repeat(x, k * two, axis=0)

  image_tokens = image_out["tokens"]
  if caption_tokens == "masked":
    image_rep = {key: repeat(v) for key, v in image_out.items()}
    masks = module.choose_masks(jax.random.PRNGKey(0), image_rep, text_out, flat)
    image_tokens = layers.take_tokens(image_rep["tokens"], masks.ic_keep)
  else:
    image_tokens = repeat(image_tokens)
  logits = module.text_decoder(text_out["tokens"][:, :-1], image_tokens)
  out["loglik"] = losses.sequence_log_likelihood(logits, flat, module.pad_id)[0].reshape(b, k, two)
  return out


def _text_pass(module: SyCoCa, text):
  return {"embedding": module.encode_text(text)["embedding"]}


def default_config() -> ml_collections.ConfigDict:
  return evaluators.eval_config(
      "retrieval", split="test", batch_size=64, max_examples=0, ks=(1, 5, 10), fine_grained=True,
      fine_grained_kinds=scenes_lib.NEGATIVE_KINDS, fine_grained_seed=0, caption_tokens="all", cache_images=True)


@evaluators.register("retrieval", default_config)
class Retrieval:
  """Image <-> text retrieval on an eval split with several captions per image (+ scenes fine-grained)."""

  def __init__(self, model: SyCoCa, cfg: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
               prefix: str):
    self.model, self.cfg, self.prefix = model, cfg, prefix
    if cfg.caption_tokens not in ("all", "masked"):
      raise ValueError(f"evals.{self.prefix}.caption_tokens={cfg.caption_tokens!r}: use 'all' or 'masked'.")
    split = pipeline.load_eval_split(data_config, cfg.split, cfg.max_examples)
    if split.captions is None:
      raise ValueError(f"Split {cfg.split!r} of {data_config.name!r} has no captions to retrieve.")
    self.tokenizer = tokenizer_from_config(data_config)
    texts, owner = [], []
    for i, captions in enumerate(split.captions):
      texts += captions
      owner += [i] * len(captions)
    self.num_images = len(split)
    self.text_ids = self.tokenizer.encode(texts)                      # [M, L]
    self.text_image = np.asarray(owner, np.int64)                     # [M]
    self.batch_size = common.round_batch_size(cfg.batch_size)
    self.images = common.CachedSplitImages(split, self.batch_size, cache=cfg.cache_images)

    self.kinds = tuple(cfg.fine_grained_kinds)
    self.fine_grained = bool(cfg.fine_grained) and data_config.name == "scenes"
    if self.fine_grained:
      self.fg_texts, self.fg_valid = fine_grained_pairs(split.source, self.tokenizer, self.kinds, cfg.fine_grained_seed)

    apply = functools.partial(model.apply, method=_image_pass, caption_tokens=cfg.caption_tokens)
    self._image_fn = jax.jit(lambda params, images, texts=None: apply({"params": params}, images, texts))
    self._text_fn = jax.jit(lambda params, text: model.apply({"params": params}, text, method=_text_pass))

  def run(self, params) -> dict[str, float]:
    p, sharding = self.prefix, common.data_sharding(params)
    if self.fine_grained:
      image_out = common.collect(lambda b: self._image_fn(params, b["image"], b["fg_texts"]),
                                 self.images.iterate({"fg_texts": self.fg_texts}, sharding), self.num_images)
    else:
      image_out = common.collect(lambda b: self._image_fn(params, b["image"]), self.images.iterate(None, sharding),
                                 self.num_images)
    text_out = common.collect(lambda b: self._text_fn(params, b["text"]),
                              common.array_batches({"text": self.text_ids}, self.batch_size, sharding=sharding),
                              len(self.text_ids))

    # Images that could not be read leave the gallery, together with their captions.
    keep = image_out["valid"]
    new_index = np.cumsum(keep) - 1
    caption_keep = keep[self.text_image]
    metrics = recall_metrics(image_out["embedding"][keep], text_out["embedding"][caption_keep],
                             new_index[self.text_image[caption_keep]], ks=tuple(self.cfg.ks))
    out = {f"{p}/{k}": v for k, v in metrics.items()}
    out[f"{p}/num_images"] = float(keep.sum())

    if self.fine_grained:
      valid = self.fg_valid & keep[:, None]
      for score in ("itc", "loglik"):
        s = image_out[score]                                          # [N, K, 2]
        accs = []
        for k, kind in enumerate(self.kinds):
          acc = pairwise_accuracy(s[:, k, 0], s[:, k, 1], valid[:, k])
          out[f"{p}/fg_{kind}_{score}"] = acc
          accs.append(acc)
        out[f"{p}/fg_mean_{score}"] = float(np.nanmean(accs)) if not np.all(np.isnan(accs)) else float("nan")
    return out
