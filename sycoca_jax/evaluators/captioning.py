"""Image captioning: generate a caption per image, score it against the references.

Metrics (names prefixed with the evaluator's prefix, 'captioning/' by default):
  bleu_1 .. bleu_4, rouge_l, cider   pycocoevalcap, on the COCO caption toolkit's tokenisation: Stanford's
                                     PTBTokenizer (Java) lower-cases and drops punctuation. Without Java, a
                                     simple stand-in (lower-case, split punctuation off, drop the same
                                     punctuation) is used instead and a warning says so: close, not identical.
                                     `cider` is the toolkit's Cider, which is CIDEr-D (sigma 6, clipped counts).
  meteor                             METEOR 1.5 (Java, a few seconds to start); absent when Java is missing or
                                     `meteor=False`.
  sg_precision, sg_recall, sg_f1     built-in scenes only: the objects the caption mentions against the scene
                                     graph (`scene_graph_f1`).
  mean_log_prob, mean_length         sampler log-probability per caption, words per caption
  num_images                         images captioned (unreadable ones are left out)

Config (config.evals.<name>, type='captioning'):
  split           eval split ('test' / 'test_comp' for scenes; Karpathy 'test' of COCO via coco_json or tfds)
  data            optional overrides of config.data (e.g. evaluate a scenes-trained model on COCO)
  batch_size      global batch (rounded up to a multiple of the device count)
  max_examples    caption the first n images only (0: all)
  sampler         'beam' | 'greedy' (sycoca_jax.decoding)
  beam_size, alpha, min_len, max_len   sampler settings (max_len 0: the tokenizer's max_len)
  tokenization    'ptb' (Java, falls back to 'simple' with a warning) | 'simple'
  meteor          compute METEOR if Java is present
  scene_graph     compute the scene-graph F1 on the built-in scenes
  cache_images    keep decoded images in host memory between runs
  predictions_path  if set (a local path or a gs:// URL), process 0 writes the generated captions there as
                    JSON after each run
  prefix          metric-name prefix (default 'captioning'), e.g. 'captioning_coco'

Multi-process: every process decodes its slice of each padded global batch (common.py), the tokens are
gathered to every host, process 0 computes the metrics (the Java scorers run once) and broadcasts them, so
every process returns the same dict, equal to a one-process run.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sycoca_jax import decoding
from sycoca_jax import evaluators
from sycoca_jax import paths
from sycoca_jax.data import pipeline
from sycoca_jax.data import scenes as scenes_lib
from sycoca_jax.data import tokenizer_from_config
from sycoca_jax.evaluators import common

# ------------------------------------------------------------------------------------------------ COCO metrics

# What the toolkit's PTB tokenisation drops (pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS).
_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"])
_SIMPLE_TOKENS = re.compile(r"\.\.\.|--|''|``|[\w']+|[^\w\s]")


def java_available() -> bool:
  return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
  """Java-free stand-in for the PTB tokenisation: lower-case, punctuation split off and dropped."""
  return " ".join(w for w in _SIMPLE_TOKENS.findall(text.lower().replace("\n", " ")) if w not in _PUNCTUATION)


def tokenize_for_scoring(texts: Mapping, tokenization: str = "ptb") -> dict:
  """{id: [str, ...]} -> {id: [tokenised str, ...]} as the COCO toolkit scores them."""
  if tokenization == "ptb" and java_available():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=g-import-not-at-top

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in texts.items()})
  if tokenization == "ptb":
    logging.warning("Java not found: scoring captions with a simple lower-case / punctuation tokenisation "
                    "instead of the COCO toolkit's PTBTokenizer (numbers close to, not equal to, published ones).")
  elif tokenization != "simple":
    raise ValueError(f"tokenization={tokenization!r}: use 'ptb' or 'simple'.")
  return {k: [simple_tokenize(c) for c in v] for k, v in texts.items()}


def coco_caption_metrics(predictions: Mapping, references: Mapping, *, tokenization: str = "ptb",
                         meteor: bool = True) -> dict[str, float]:
  """Corpus BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR) of {id: caption} against {id: [reference, ...]}."""
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top

  if set(predictions) != set(references):
    raise ValueError("predictions and references must have the same ids.")
  if not predictions:
    return {}
  # One tokeniser call for both sides (one Java start).
  both = tokenize_for_scoring({**{("res", k): [v] for k, v in predictions.items()},
                               **{("gts", k): list(v) for k, v in references.items()}}, tokenization)
  res = {k: both[("res", k)] for k in predictions}
  gts = {k: both[("gts", k)] for k in predictions}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  out = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
  out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
  out["cider"] = float(Cider().compute_score(gts, res)[0])
  if meteor:
    if java_available():
      out["meteor"] = _meteor(gts, res)
    else:
      logging.warning("Java not found: METEOR skipped.")
  return out


def _meteor(gts: Mapping, res: Mapping) -> float:
  from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=g-import-not-at-top

  scorer = Meteor()
  try:
    return float(scorer.compute_score(gts, res)[0])
  finally:  # the scorer is a Java subprocess: do not leave it running
    proc = scorer.meteor_p
    for stream in (proc.stdin, proc.stdout, proc.stderr):
      stream.close()
    proc.kill()
    proc.wait()


# ------------------------------------------------------------------------------------------------ scene graphs

_SHAPE_OF = {w: s for s, words in scenes_lib.SHAPE_WORDS.items() for w in words}
_SHAPE_OF |= {scenes_lib.SHAPE_PLURALS[w]: s for w, s in list(_SHAPE_OF.items())}
_SHAPE_OF |= {d: d for d in scenes_lib.DIGITS} | {f"{d}s": d for d in scenes_lib.DIGITS}
_GENERIC = frozenset(scenes_lib.GENERIC_NOUNS) | frozenset(scenes_lib.GENERIC_PLURALS.values())
_COLOUR_OF = {w: c for c, words in scenes_lib.COLOUR_WORDS.items() for w in words}
_ADJECTIVES = frozenset(w for words in (*scenes_lib.SIZE_WORDS.values(), *scenes_lib.FILL_WORDS.values())
                        for w in words)
_DIGIT_NOUNS = frozenset(("digit", "number"))
_WORDS = re.compile(r"[a-z0-9]+")


def parse_mentions(caption: str) -> list[tuple[str | None, str | None]]:
  """The objects a caption mentions, as (colour, kind) with None where it says nothing.

  A mention is a noun (a shape word or its plural, a digit, 'digit 7' / 'number 7', or a generic noun such as
  'object') with the colour word of its noun phrase: "a small red circle left of two 7s" ->
  [('red', 'circle'), (None, '7')]. A generic noun without a colour says nothing and is dropped; so is a colour
  without a noun. Size and fill words may stand between the colour and the noun.
  """
  mentions = []
  colour = None
  words = _WORDS.findall(caption.lower())
  for i, w in enumerate(words):
    if w in _COLOUR_OF:
      colour = _COLOUR_OF[w]
    elif w in _ADJECTIVES:
      continue
    elif w in _DIGIT_NOUNS and i + 1 < len(words) and words[i + 1] in scenes_lib.DIGITS:
      continue  # 'digit 7': the digit itself is the noun
    elif w in _SHAPE_OF:
      mentions.append((colour, _SHAPE_OF[w]))
      colour = None
    elif w in _GENERIC:
      if colour is not None:
        mentions.append((colour, None))
      colour = None
    else:
      colour = None
  return mentions


def _matches(mention: tuple[str | None, str | None], obj: Mapping) -> bool:
  colour, kind = mention
  return (colour is None or obj["colour"] == colour) and (kind is None or obj["shape"] == kind)


def mentioned_objects(caption: str, graph: Mapping) -> list[int]:
  """Indices of the scene-graph objects the caption names: those that some mention of it matches."""
  mentions = parse_mentions(caption)
  return [k for k, obj in enumerate(graph["objects"]) if any(_matches(m, obj) for m in mentions)]


def scene_graph_counts(caption: str, graph: Mapping) -> tuple[int, int, int, int]:
  """(correct mentions, mentions, objects recalled, objects) of one caption against its scene graph.

  A mention is correct if some object of the scene has every attribute it states. An object is recalled if
  some correct mention matches it.
  """
  mentions = parse_mentions(caption)
  objects = graph["objects"]
  correct = [m for m in mentions if any(_matches(m, o) for o in objects)]
  recalled = sum(any(_matches(m, o) for m in correct) for o in objects)
  return len(correct), len(mentions), recalled, len(objects)


def scene_graph_f1(captions: Sequence[str], graphs: Sequence[Mapping]) -> dict[str, float]:
  """Micro-averaged precision / recall / F1 of the objects captions mention (see `scene_graph_counts`).

  Reference captions score precision 1 (each states only true claims), recall below 1 (a caption describes
  one to four of the objects). A caption that mentions nothing has no precision to lose and recalls nothing.
  """
  counts = np.asarray([scene_graph_counts(c, g) for c, g in zip(captions, graphs)], np.int64).reshape(-1, 4)
  correct, mentioned, recalled, objects = counts.sum(axis=0)
  precision = correct / mentioned if mentioned else 0.0
  recall = recalled / objects if objects else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"sg_precision": float(precision), "sg_recall": float(recall), "sg_f1": float(f1)}


# ------------------------------------------------------------------------------------------------ evaluator


def default_config() -> ml_collections.ConfigDict:
  return evaluators.eval_config(
      "captioning", split="test", batch_size=64, max_examples=0, sampler="beam", beam_size=4, alpha=0.6,
      min_len=0, max_len=0, tokenization="ptb", meteor=True, scene_graph=True, cache_images=True,
      predictions_path="")


_COCO_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
_SG_KEYS = ("sg_precision", "sg_recall", "sg_f1")
_OTHER_KEYS = ("mean_log_prob", "mean_length", "num_images")


@evaluators.register("captioning", default_config)
class Captioning:
  """Generates a caption per image of an eval split and scores them (module docstring)."""

  def __init__(self, model, cfg: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict, prefix: str):
    self.model, self.cfg, self.prefix = model, cfg, prefix
    split = pipeline.load_eval_split(data_config, cfg.split, cfg.max_examples)
    if split.captions is None:
      raise ValueError(f"Split {cfg.split!r} of {data_config.name!r} has no reference captions.")
    self.references = split.captions
    self.scene_graphs = split.scene_graphs if cfg.scene_graph else None
    self.num_images = len(split)
    self.tokenizer = tokenizer_from_config(data_config)
    self.batch_size = common.round_batch_size(cfg.batch_size)
    self.images = common.CachedSplitImages(split, self.batch_size, cache=cfg.cache_images)
    max_len = min(cfg.max_len or self.tokenizer.max_len, model.text_encoder.context_length)
    kw = dict(min_len=cfg.min_len)
    if cfg.sampler == "beam":
      kw.update(beam_size=cfg.beam_size, alpha=cfg.alpha)
    elif cfg.sampler != "greedy":
      raise ValueError(f"evals.{self.prefix}.sampler={cfg.sampler!r}: use {sorted(decoding.SAMPLERS)}.")
    self._caption = decoding.build_captioner(
        model, sampler=cfg.sampler, bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
        pad_id=self.tokenizer.pad_id, max_len=max_len, **kw)
    self.last_predictions: list[str] | None = None

  def _keys(self) -> tuple[str, ...]:
    return _COCO_KEYS + (_SG_KEYS if self.scene_graphs is not None else ()) + _OTHER_KEYS

  def generate(self, params) -> dict[str, np.ndarray]:
    """Decoded outputs in dataset order on every process: tokens [N, T], log_probs [N], valid [N]."""

    def fn(batch):
      decoded = self._caption(params, batch["image"])
      return {"tokens": decoded.tokens, "log_probs": decoded.log_probs}

    # Batches follow the weights' mesh (the trainer's, during training): jit refuses mixed device assignments.
    return common.collect(fn, self.images.iterate(sharding=common.data_sharding(params)), self.num_images)

  def score(self, captions: Sequence[str], valid: np.ndarray, log_probs: np.ndarray) -> dict[str, float]:
    """Metrics of generated captions (dataset order); rows with valid False are left out."""
    keep = np.flatnonzero(valid)
    preds = {int(i): captions[i] for i in keep}
    refs = {int(i): list(self.references[i]) for i in keep}
    out = coco_caption_metrics(preds, refs, tokenization=self.cfg.tokenization, meteor=self.cfg.meteor)
    if self.scene_graphs is not None:
      out |= scene_graph_f1([captions[i] for i in keep], [self.scene_graphs[i] for i in keep])
    out["mean_log_prob"] = float(np.mean(log_probs[keep])) if len(keep) else float("nan")
    out["mean_length"] = float(np.mean([len(captions[i].split()) for i in keep])) if len(keep) else 0.0
    out["num_images"] = float(len(keep))
    return out

  def run(self, params) -> dict[str, float]:
    out = self.generate(params)
    captions = self.tokenizer.decode(out["tokens"])
    self.last_predictions = captions
    keys = self._keys()
    values = np.full(len(keys), np.nan, np.float64)
    if jax.process_index() == 0:
      metrics = self.score(captions, out["valid"], out["log_probs"])
      values = np.asarray([metrics.get(k, np.nan) for k in keys], np.float64)
      if self.cfg.predictions_path:
        self._write(captions, out["valid"])
    if jax.process_count() > 1:  # the scorers ran on process 0 only
      # As raw bits: without jax_enable_x64 a float64 array would come back rounded to float32.
      bits = multihost_utils.broadcast_one_to_all(values.view(np.uint32))
      values = np.asarray(bits, np.uint32).view(np.float64)
    # Skipped metrics (METEOR without Java) are absent, the same on every process.
    return {f"{self.prefix}/{k}": float(v) for k, v in zip(keys, values) if not np.isnan(v)}

  def _write(self, captions: Sequence[str], valid: np.ndarray) -> None:
    path = paths.resolve(self.cfg.predictions_path)  # a local file or a gs:// object
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"index": int(i), "caption": captions[i], "references": list(self.references[i])}
            for i in np.flatnonzero(valid)]
    path.write_text(json.dumps(rows, indent=1))
