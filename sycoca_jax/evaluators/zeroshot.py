"""Zero-shot classification with prompt ensembles (CLIP's recipe).

Each class name goes through every prompt template ("a photo of a {}."); the text tower's normalised
embeddings are averaged over the templates and renormalised, giving one classifier row per class. An image is
assigned to the class whose row is most similar to its embedding.

With `captioner=True` the captioner classifies too, generatively: each image is scored against every prompt by
log p(prompt | image) (every patch visible, summed over the prompt's tokens), averaged over the templates, and
assigned to the class with the highest mean. It measures what the captioner has learnt to say about an image,
apart from what the contrastive embeddings hold (the two can differ: a class can be in the patch tokens the
captioner reads and not in the pooled embedding). It runs the decoder once per image and prompt.

Shape legend: N images, C classes, T templates, E joint embedding.

Metric functions (`class_embeddings`, `topk_accuracy`) take arrays; `ZeroShot` runs the model.

Config (config.evals.<name>, type='zeroshot'):
  datasets      names (evaluators/datasets.py): scenes_shape, scenes_colour, scenes_digit, sklearn_digits,
                tfds:<name>[:<split>] (a prepared TFDS classification set)
  templates     prompt templates for every set (empty: each set's own: the scenes templates, digit templates
                for sklearn_digits, CLIP-style photo prompts otherwise)
  class_names   names to use for a tfds set whose label names are not words (e.g. ImageNet synset ids)
  ks            top-k cut-offs (k >= C counts every image as a hit)
  captioner     also classify with the captioner's likelihood of each prompt (above)
  batch_size, max_examples (per set, 0: all), cache_images, prefix (default 'zeroshot')
Metrics: <prefix>/<set>_top1, <prefix>/<set>_top5, ..., and <prefix>/mean_top1 over the sets; with captioner,
<prefix>/<set>_captioner_top1, ... and <prefix>/captioner_mean_top1 as well.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sycoca_jax import evaluators
from sycoca_jax import losses
from sycoca_jax.data import tokenizer_from_config
from sycoca_jax.evaluators import common
from sycoca_jax.evaluators import datasets as datasets_lib
from sycoca_jax.models.sycoca import SyCoCa


def class_embeddings(text_emb: np.ndarray) -> np.ndarray:
  """Prompt-ensemble classifier: text embeddings [C, T, E] -> [C, E] (normalise, mean over T, renormalise)."""
  text_emb = np.asarray(text_emb, np.float32)
  text_emb = text_emb / np.maximum(np.linalg.norm(text_emb, axis=-1, keepdims=True), 1e-12)
  mean = text_emb.mean(axis=1)
  return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
  """{'top1': ..., 'top5': ...}: fraction of rows whose label is among the k highest logits [N, C].

  Ties are scored against the model: a wrong class scoring equal to the right one ranks first.
  """
  logits, labels = np.asarray(logits), np.asarray(labels)
  own = logits[np.arange(len(labels)), labels]
  rank = (logits >= own[:, None]).sum(axis=1) - 1
  return {f"top{k}": float(np.mean(rank < k)) for k in ks}


def _encode_images(module: SyCoCa, images):
  return {"embedding": module.encode_image(images)["embedding"]}


def _encode_texts(module: SyCoCa, text):
  return {"embedding": module.encode_text(text)["embedding"]}


def _prompt_log_likelihoods(module: SyCoCa, images, prompts):
  """images [B, S, S, 3], prompts [P, L] -> {'embedding' [B, E], 'loglik' [B, P]: log p(prompt | image)}.

  The image is encoded once; the decoder runs once per prompt over the whole batch (lax.map keeps one prompt's
  activations live at a time)."""
  image_out = module.encode_image(images)

  def one(prompt):
    text = jnp.broadcast_to(prompt, (images.shape[0], prompt.shape[0]))
    logits = module.caption_logits(image_out["tokens"], text)
    return losses.sequence_log_likelihood(logits, text, module.pad_id)[0]

  return {"embedding": image_out["embedding"], "loglik": jax.lax.map(one, prompts).T}


def default_config() -> ml_collections.ConfigDict:
  return evaluators.eval_config(
      "zeroshot", datasets=("scenes_shape", "scenes_colour", "scenes_digit", "sklearn_digits"), templates=(),
      class_names=(), ks=(1, 5), batch_size=64, max_examples=0, cache_images=True, captioner=False)


@evaluators.register("zeroshot", default_config)
class ZeroShot:
  """Top-k zero-shot accuracy of prompt-ensemble classifiers on one or more labelled image sets."""

  def __init__(self, model: SyCoCa, cfg: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
               prefix: str):
    self.model, self.cfg, self.prefix = model, cfg, prefix
    self.tokenizer = tokenizer_from_config(data_config)
    self.batch_size = common.round_batch_size(cfg.batch_size)
    self.sets, self.prompts = [], []
    for name in cfg.datasets:
      image_set = datasets_lib.load(name, data_config, max_examples=cfg.max_examples,
                                    class_names=tuple(cfg.class_names) or None)
      image_set.cache = cfg.cache_images
      templates = tuple(cfg.templates) or image_set.templates
      texts = [t.format(c) for c in image_set.class_names for t in templates]
      self.sets.append(image_set)
      self.prompts.append((self.tokenizer.encode(texts), len(image_set.class_names), len(templates)))
    self._image_fn = jax.jit(lambda params, images: model.apply({"params": params}, images, method=_encode_images))
    self._text_fn = jax.jit(lambda params, text: model.apply({"params": params}, text, method=_encode_texts))
    # With the captioner: one program per set, its prompts a constant of it (the same on every process).
    self._scored_fns = [jax.jit(functools.partial(self._score, prompts=ids)) for ids, _, _ in self.prompts
                        ] if cfg.captioner else []

  def _score(self, params, images, prompts):
    return self.model.apply({"params": params}, images, prompts, method=_prompt_log_likelihoods)

  def classifier(self, params, prompt_ids: np.ndarray, num_classes: int, num_templates: int) -> np.ndarray:
    """[C, E] class embeddings from the prompts' token ids [C * T, L]."""
    batches = common.array_batches({"text": prompt_ids}, self.batch_size, sharding=common.data_sharding(params))
    out = common.collect(lambda b: self._text_fn(params, b["text"]), batches, len(prompt_ids))
    return class_embeddings(out["embedding"].reshape(num_classes, num_templates, -1))

  def run(self, params) -> dict[str, float]:
    out, top1, captioner_top1 = {}, [], []
    for i, (image_set, (prompt_ids, c, t)) in enumerate(zip(self.sets, self.prompts)):
      weights = self.classifier(params, prompt_ids, c, t)
      batches = image_set.batches(self.batch_size, sharding=common.data_sharding(params))
      image_fn = self._scored_fns[i] if self.cfg.captioner else self._image_fn
      images = common.collect(lambda b: image_fn(params, b["image"]), batches, len(image_set))
      valid, labels = images["valid"], image_set.labels[images["valid"]]
      logits = images["embedding"][valid] @ weights.T
      for key, value in topk_accuracy(logits, labels, tuple(self.cfg.ks)).items():
        out[f"{self.prefix}/{image_set.name}_{key}"] = value
      top1.append(out[f"{self.prefix}/{image_set.name}_top1"])
      if self.cfg.captioner:
        scores = images["loglik"][valid].reshape(-1, c, t).mean(axis=-1)  # the class order of the prompts
        for key, value in topk_accuracy(scores, labels, tuple(self.cfg.ks)).items():
          out[f"{self.prefix}/{image_set.name}_captioner_{key}"] = value
        captioner_top1.append(out[f"{self.prefix}/{image_set.name}_captioner_top1"])
    out[f"{self.prefix}/mean_top1"] = float(np.mean(top1))
    if captioner_top1:
      out[f"{self.prefix}/captioner_mean_top1"] = float(np.mean(captioner_top1))
    return out
