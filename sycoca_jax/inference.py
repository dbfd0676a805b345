"""A small Python API for a trained SyCoCa model: embeddings, captions, image-text scores.

    from sycoca_jax import inference
    model = inference.load("/path/to/workdir")          # latest checkpoint; step=N for another one
    model.caption(images)                               # -> ["a red circle left of a blue star", ...]
    model.caption(images, sampler="greedy", max_len=20)
    model.embed_images(images)                          # -> float32 [n, E], L2-normalised
    model.embed_texts(["a red circle", "two stars"])    # -> float32 [m, E], L2-normalised
    model.score(images, texts)                          # -> {'similarity', 'logit', 'log_likelihood', ...}

Images may be a PIL image, an image file's path (local or gs://), a list of PIL images / paths / arrays of any
sizes, or an array [H, W, 3] / [n, H, W, 3] (grey [.., H, W] too). uint8 arrays are pixels 0..255, float arrays
pixels in [0, 1] (others are refused, not clipped). Texts are a list of strings; one string is one text. Each
image is resized (shorter side) and centre-cropped to the model's image size as uint8, as the evaluation
pipeline does, and normalised with CLIP's mean / std on the device (sycoca_jax.pixels). Arrays already
prepared that way (e.g. batches of sycoca_jax.data: uint8 [n, S, S, 3]; float ones are taken as normalised)
are passed with `preprocessed=True`.

Everything runs in fixed-size chunks of `batch_size` (the last one padded), so each function compiles once.
Without a checkpoint, construct `Inference(model_config, params, tokenizer)` directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from sycoca_jax import decoding, losses, paths
from sycoca_jax.data import pipeline
from sycoca_jax.data import tokenizer_from_config
from sycoca_jax.models.sycoca import SyCoCa
from sycoca_jax.models.sycoca import build_model


def _is_path(image: Any) -> bool:
  return isinstance(image, (str, os.PathLike))


def _as_pil(image: Any) -> Image.Image:
  if isinstance(image, Image.Image):
    return pipeline.to_rgb(image)
  if _is_path(image):
    with paths.resolve(image).open("rb") as f:
      pil = Image.open(f)
      pil.load()  # PIL reads lazily: read the pixels before the file closes
    return pipeline.to_rgb(pil)
  x = np.asarray(image)
  if x.dtype != np.uint8:
    if not np.issubdtype(x.dtype, np.floating):
      raise TypeError(f"Images must be uint8 (0..255) or float (0..1) arrays, got {x.dtype}.")
    # Clipping would silently turn 0..255 floats white and normalised (mean/std) inputs into noise.
    lo, hi = (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 0.0)
    if lo < -_FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK or not np.isfinite(lo + hi):
      raise ValueError(f"Float images must be pixels in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]. Divide 0..255 "
                       "pixels by 255 (or pass uint8); pass images already normalised with preprocessed=True.")
    x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (3, 4)):
    raise ValueError(f"An image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape {x.shape}.")
  return pipeline.to_rgb(Image.fromarray(x))


# Float pixels a little outside [0, 1] (resampling overshoot) are rounded into range, not refused.
_FLOAT_SLACK = 1e-3


def preprocess(images: Any, image_size: int) -> np.ndarray:
  """Images (see the module docstring) -> uint8 [n, S, S, 3], resized and centre-cropped (the model normalises)."""
  if isinstance(images, Image.Image) or _is_path(images):
    images = [images]
  elif isinstance(images, np.ndarray) and (images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4))):
    images = [images]  # one [H, W] / [H, W, C] image; [n, H, W] (W > 4) is a stack of grey images
  out = [np.asarray(pipeline.resize_center_crop(_as_pil(im), image_size)) for im in images]
  return np.stack(out) if out else np.zeros((0, image_size, image_size, 3), np.uint8)


class Inference:
  """A model, its weights and its tokenizer, behind numpy-in / numpy-out methods (module docstring)."""

  def __init__(self, model_config, params, tokenizer, image_size: int | None = None, *, batch_size: int = 16):
    self.model_config, self.params, self.tokenizer = model_config, params, tokenizer
    self.model: SyCoCa = build_model(model_config)
    self.image_size = image_size or model_config.vision.image_size
    if self.image_size != model_config.vision.image_size:
      raise ValueError(f"image_size={self.image_size} differs from the model's {model_config.vision.image_size}.")
    if tokenizer.vocab_size > model_config.text.vocab_size:
      raise ValueError(f"The tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                       f"({model_config.text.vocab_size}).")
    self.batch_size = batch_size
    model = self.model
    apply = lambda method: (lambda p, *a: model.apply({"params": p}, *a, method=method))
    self._encode_image = jax.jit(lambda p, x: {k: v for k, v in apply(SyCoCa.encode_image)(p, x).items()
                                               if k in ("embedding", "tokens")})
    self._encode_text = jax.jit(lambda p, t: apply(SyCoCa.encode_text)(p, t)["embedding"])
    self._temperature = jax.jit(apply(SyCoCa.temperature))
    self._token_ll = jax.jit(self._token_log_likelihood_fn)
    self._captioners: dict = {}

  # -- helpers --------------------------------------------------------------------------------------------------

  def _images(self, images, preprocessed: bool) -> np.ndarray:
    if preprocessed:
      x = np.asarray(images)
      x = x if x.dtype == np.uint8 else x.astype(np.float32)  # uint8 pixels, or floats normalised already
      if x.ndim == 3:
        x = x[None]
      if x.shape[1:] != (self.image_size, self.image_size, 3):
        raise ValueError(f"Preprocessed images must be [n, {self.image_size}, {self.image_size}, 3]; got {x.shape}.")
      return x
    return preprocess(images, self.image_size)

  def _chunks(self, fn, *arrays):
    """fn over fixed-size chunks of the leading axis (last one padded); outputs concatenated, padding dropped."""
    n, b = len(arrays[0]), self.batch_size
    outs = []
    for s in range(0, n, b):
      chunk = [a[s:s + b] for a in arrays]
      pad = b - len(chunk[0])
      chunk = [np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)]) if pad else c for c in chunk]
      outs.append(jax.tree.map(lambda x: np.asarray(x)[:b - pad], fn(*chunk)))
    if not outs:
      raise ValueError("No inputs given.")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def _token_log_likelihood_fn(self, params, images, tokens):
    image_tokens = self.model.apply({"params": params}, images, method=SyCoCa.encode_image)["tokens"]
    logits = self.model.apply({"params": params}, image_tokens, tokens, method=SyCoCa.caption_logits)
    total, count = losses.sequence_log_likelihood(logits, tokens, self.tokenizer.pad_id)
    return {"sum": total, "count": count}

  # -- the API --------------------------------------------------------------------------------------------------

  def embed_images(self, images, *, preprocessed: bool = False) -> np.ndarray:
    """L2-normalised image embeddings, float32 [n, E]."""
    x = self._images(images, preprocessed)
    return self._chunks(lambda c: self._encode_image(self.params, c)["embedding"], x)

  def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
    """L2-normalised text embeddings, float32 [m, E] (one string: [1, E])."""
    return self._chunks(lambda t: self._encode_text(self.params, t), self.tokenizer.encode(_text_list(texts)))

  def caption(self, images, sampler: str = "beam", *, preprocessed: bool = False, return_log_probs: bool = False,
              max_len: int | None = None, **sampler_kw):
    """One caption per image. sampler 'beam' (beam_size=4, alpha=0.6, min_len=0) or 'greedy' (min_len=0).

    max_len counts tokens with bos and eos (default: the tokenizer's). With return_log_probs=True, returns
    (captions, log_probs [n]): the sum of the caption's token log-probabilities, eos included.
    """
    max_len = min(max_len or self.tokenizer.max_len, self.model.text_encoder.context_length)
    key = (sampler, max_len, tuple(sorted(sampler_kw.items())))
    if key not in self._captioners:
      self._captioners[key] = decoding.build_captioner(
          self.model, sampler=sampler, bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
          pad_id=self.tokenizer.pad_id, max_len=max_len, **sampler_kw)
    fn = self._captioners[key]
    out = self._chunks(lambda c: fn(self.params, c)._asdict(), self._images(images, preprocessed))
    captions = self.tokenizer.decode(out["tokens"])
    return (captions, out["log_probs"]) if return_log_probs else captions

  def score(self, images, texts: str | Sequence[str], *, preprocessed: bool = False) -> dict[str, np.ndarray]:
    """Scores of image-text pairs (image i with text i; one image is paired with every text).

    Returns float32 [m] arrays:
      similarity           ITC cosine similarity of the embeddings
      logit                similarity times the learned temperature (what the contrastive loss sees)
      log_likelihood       log p(text | image) from the captioner (every patch visible), eos included
      mean_log_likelihood  log_likelihood per token
    """
    texts = _text_list(texts)
    x = self._images(images, preprocessed)
    if len(x) == 1 and len(texts) > 1:
      x = np.repeat(x, len(texts), axis=0)
    if len(x) != len(texts):
      raise ValueError(f"{len(x)} images and {len(texts)} texts: pass as many of each, or one image.")
    ids = self.tokenizer.encode(texts)
    image_emb = self._chunks(lambda c: self._encode_image(self.params, c)["embedding"], x)
    text_emb = self._chunks(lambda t: self._encode_text(self.params, t), ids)
    similarity = np.sum(image_emb * text_emb, axis=-1)
    ll = self._chunks(lambda c, t: self._token_ll(self.params, c, t), x, ids)
    return {"similarity": similarity, "logit": similarity * float(self._temperature(self.params)),
            "log_likelihood": ll["sum"], "mean_log_likelihood": (ll["sum"] / np.maximum(ll["count"], 1)).astype(np.float32)}


def _text_list(texts: str | Sequence[str]) -> list[str]:
  """One string is one text (list() of it would make one text per character)."""
  if isinstance(texts, str):
    return [texts]
  texts = list(texts)
  bad = [t for t in texts if not isinstance(t, str)]
  if bad:
    raise TypeError(f"Texts must be strings; got {type(bad[0]).__name__} {bad[0]!r}.")
  return texts


def load(workdir_or_checkpoint: str, step: int | None = None, **kw) -> Inference:
  """An Inference for a training workdir's (a folder or gs:// URL) latest checkpoint (or `step`); kw to Inference()."""
  from sycoca_jax import checkpoint  # pylint: disable=g-import-not-at-top

  config, params, *_ = checkpoint.load_params(workdir_or_checkpoint, step)
  return Inference(config.model, params, tokenizer_from_config(config.data), **kw)
