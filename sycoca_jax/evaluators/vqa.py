"""Visual question answering as answer classification over the multimodal decoder (CoCa's VQA recipe).

The question is fed to the text tower as a caption would be; the multimodal decoder cross-attends to the
image's patch tokens, and its final features [B, L, D] are pooled (mean over the question's real tokens, or
the last one, the end-of-text token, which has seen the whole question) into a linear classifier over the
answer vocabulary. The model and the head are fine-tuned together for a few steps on a copy of the weights
(the evaluated params are never changed), then scored on the test questions.

Shape legend: Q questions, I images, A answers, R reference answers per question, L question tokens,
D decoder width, B global batch, S image side.

Data (config `datasets`):
  scenes    template questions of the built-in scenes (train: `num_train` train scenes, test: the test split);
            single-word answers (data.scenes.VQA_ANSWERS)
  easy_vqa  the easy-VQA set shipped inside its PyPI wheel (pip install easy-vqa): 64 x 64 shape images,
            38,575 train / 9,673 test questions, 13 answers
  vqav2     VQAv2-format JSON files (questions + annotations, COCO images), paths in config `vqav2`; the answer
            vocabulary is the `num_answers` most frequent training answers
Targets are soft: a reference answer given by k of the annotators scores min(1, k / 3) (VQAv2's accuracy,
without its leave-one-annotator-out averaging; one-hot for scenes and easy-VQA). The loss is softmax
cross-entropy against the targets normalised to sum 1; accuracy is the mean score of the predicted answer.

Config (config.evals.<name>, type='vqa'):
  datasets, pool ('mean' | 'last'), train ('all' | 'decoder' | 'head': what fine-tuning updates besides the
  head), steps, batch_size, learning_rate, weight_decay, warmup_steps, head_lr_mult, num_train,
  max_train_questions / max_test_questions (0: all), seed, vqav2 (train/test questions, annotations,
  image_dir; image_pattern; num_answers), prefix (default 'vqa')
Metrics: <prefix>/<set>_acc.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sycoca_jax import evaluators
from sycoca_jax.data import pipeline
from sycoca_jax.data import scenes as scenes_lib
from sycoca_jax.data import sources
from sycoca_jax.data import tokenizer_from_config
from sycoca_jax.evaluators import common
from sycoca_jax.evaluators import datasets as datasets_lib
from sycoca_jax.evaluators import finetune
from sycoca_jax.models.sycoca import SyCoCa

POOLS = ("mean", "last")
TRAINABLE = ("all", "decoder", "head")

# ------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class VqaData:
  """Questions over a set of images. Images are raw uint8 arrays in memory or file paths (loaded per batch)."""

  name: str
  questions: list[str]
  image_index: np.ndarray                 # int32 [Q]: the image each question is about
  answer_ids: np.ndarray                  # int32 [Q, R]: reference answers in the vocabulary, -1 padding
  answer_scores: np.ndarray               # float32 [Q, R]: their scores in [0, 1]
  raw_images: np.ndarray | None = None    # uint8 [I, H, W, C]
  image_paths: Sequence[str] | None = None

  def __len__(self) -> int:
    return len(self.questions)

  def images(self, indices: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [n, S, S, 3] of the given images."""
    if self.raw_images is not None:
      return common.images_from_arrays(self.raw_images[np.asarray(indices)], image_size)
    return np.stack([common.load_image_file(self.image_paths[int(i)], image_size) for i in indices])

  def targets(self, rows: np.ndarray, num_answers: int) -> np.ndarray:
    """Dense soft targets float32 [n, A] of the given questions."""
    ids, scores = self.answer_ids[rows], self.answer_scores[rows]
    out = np.zeros((len(rows), num_answers + 1), np.float32)  # column A collects the padding
    np.put_along_axis(out, np.where(ids < 0, num_answers, ids), scores, axis=1)
    return out[:, :num_answers]

  def head(self, n: int) -> VqaData:
    if not n or n >= len(self):
      return self
    return dataclasses.replace(self, questions=self.questions[:n], image_index=self.image_index[:n],
                               answer_ids=self.answer_ids[:n], answer_scores=self.answer_scores[:n])


def _raw_images(source: sources.Source) -> np.ndarray:
  """Every image of a source, uint8 [I, H, W, 3] (small sets: held whole in memory)."""
  return np.stack([np.asarray(pipeline.load_image(source[i])) for i in range(len(source))])


def _single_answers(answers: Sequence[str], vocabulary: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  index = {a: i for i, a in enumerate(vocabulary)}
  ids = np.asarray([[index.get(a, -1)] for a in answers], np.int32)
  return ids, (ids >= 0).astype(np.float32)


def load_scenes_vqa(data_config: ml_collections.ConfigDict, split: str, num_scenes: int) -> VqaData:
  """The built-in scenes' template questions (4 per scene); answers index scenes.VQA_ANSWERS."""
  cfg = datasets_lib.scenes_config(data_config)
  if split == "train":
    cfg.scenes.num_train = num_scenes or 2000
  eval_split = pipeline.load_eval_split(cfg, split, num_scenes)
  raw = _raw_images(eval_split.source)
  questions, answers, image_index = [], [], []
  for i, pairs in enumerate(eval_split.qa):
    for q, a in pairs:
      questions.append(q)
      answers.append(a)
      image_index.append(i)
  ids, scores = _single_answers(answers, scenes_lib.VQA_ANSWERS)
  return VqaData(f"scenes_{split}", questions, np.asarray(image_index, np.int32), ids, scores, raw_images=raw)


def load_easy_vqa(split: str) -> tuple[VqaData, tuple[str, ...]]:
  """easy-VQA (data.sources.EasyVqaSource, from its wheel): (data, answer vocabulary)."""
  source = sources.EasyVqaSource(split)
  ids, scores = _single_answers(source.question_answers, source.answers)
  return VqaData(f"easy_vqa_{split}", list(source.questions), source.question_image, ids, scores,
                 raw_images=_raw_images(source)), source.answers


def normalize_answer(answer: str) -> str:
  return " ".join(answer.lower().strip().rstrip(".").split())


def load_vqav2(questions_file: str, annotations_file: str, image_dir: str, image_pattern: str,
               vocabulary: Sequence[str] | None = None, num_answers: int = 3129) -> tuple[VqaData, tuple[str, ...]]:
  """VQAv2-format JSON: {'questions': [{question_id, image_id, question}], 'data_subtype'?} and
  {'annotations': [{question_id, answers: [{answer}], multiple_choice_answer}]}.

  vocabulary None: the `num_answers` most frequent multiple_choice_answers of this file (for train).
  image_pattern formats {image_id} and {data_subtype} into a path under image_dir.
  """
  for path in (questions_file, annotations_file):
    if not os.path.exists(path):
      raise FileNotFoundError(f"VQAv2 file not found: {path!r} (evals.<name>.vqav2).")
  with open(questions_file) as f:
    qdata = json.load(f)
  with open(annotations_file) as f:
    adata = json.load(f)
  annotations = {a["question_id"]: a for a in adata["annotations"]}
  subtype = qdata.get("data_subtype", "")
  if vocabulary is None:
    counts = collections.Counter(normalize_answer(a["multiple_choice_answer"]) for a in adata["annotations"])
    vocabulary = tuple(a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_answers])
  index = {a: i for i, a in enumerate(vocabulary)}
  image_ids = sorted({q["image_id"] for q in qdata["questions"]})
  position = {image_id: k for k, image_id in enumerate(image_ids)}
  paths = [os.path.join(image_dir, image_pattern.format(image_id=i, data_subtype=subtype)) for i in image_ids]
  questions, image_index, rows = [], [], []
  for q in qdata["questions"]:
    ann = annotations.get(q["question_id"])
    if ann is None:
      continue
    votes = collections.Counter(normalize_answer(a["answer"]) for a in ann["answers"])
    scored = [(index[a], min(1.0, k / 3.0)) for a, k in votes.items() if a in index]
    questions.append(q["question"])
    image_index.append(position[q["image_id"]])
    rows.append(scored)
  width = max([len(r) for r in rows] + [1])
  ids = np.full((len(rows), width), -1, np.int32)
  scores = np.zeros((len(rows), width), np.float32)
  for r, scored in enumerate(rows):
    for c, (i, s) in enumerate(scored):
      ids[r, c], scores[r, c] = i, s
  name = f"vqav2_{subtype}" if subtype else "vqav2"
  return VqaData(name, questions, np.asarray(image_index, np.int32), ids, scores, image_paths=paths), vocabulary


# ------------------------------------------------------------------------------------------------ model


def pool_features(features: jax.Array, question: jax.Array, pool: str, pad_id: int = 0) -> jax.Array:
  """[B, L, D] decoder features -> [B, D]: mean over real tokens, or the last real token."""
  valid = question != pad_id
  if pool == "mean":
    weights = valid.astype(jnp.float32)[..., None]
    return (features.astype(jnp.float32) * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
  last = jnp.maximum(valid.sum(axis=1) - 1, 0)
  return jnp.take_along_axis(features.astype(jnp.float32), last[:, None, None], axis=1)[:, 0]


def _pooled(module: SyCoCa, images, question, *, pool: str):
  image_tokens = module.encode_image(images)["tokens"]
  return pool_features(module.caption_features(image_tokens, question), question, pool, module.pad_id)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Cross-entropy against targets normalised to sum 1; rows without any target (or mask 0) are ignored."""
  total = targets.sum(axis=-1, keepdims=True)
  weights = mask * (total[:, 0] > 0)
  ce = optax.softmax_cross_entropy(logits, targets / jnp.maximum(total, 1e-9))
  return jnp.sum(ce * weights) / jnp.maximum(weights.sum(), 1.0)


class VqaClassifier:
  """Fine-tunes model + linear answer head and predicts answers; jitted functions are built once."""

  def __init__(self, model: SyCoCa, cfg: ml_collections.ConfigDict, image_size: int, head_width: int = 0):
    """head_width: answer columns of every head (at least each set's vocabulary size). Sets with fewer answers
    leave the extra columns out of the softmax, so one compiled step and one predict serve every set."""
    if cfg.pool not in POOLS:
      raise ValueError(f"evals.<vqa>.pool={cfg.pool!r}: use one of {POOLS}.")
    if cfg.train not in TRAINABLE:
      raise ValueError(f"evals.<vqa>.train={cfg.train!r}: use one of {TRAINABLE}.")
    self.model, self.cfg, self.image_size, self.head_width = model, cfg, image_size, head_width
    self.batch_size = common.round_batch_size(cfg.batch_size)
    pooled = functools.partial(_pooled, pool=cfg.pool)
    self._features = lambda params, images, question: model.apply({"params": params}, images, question,
                                                                  method=pooled)

    def logits_fn(params, head, images, question, answer_bias):
      return self._features(params, images, question) @ head["kernel"] + head["bias"] + answer_bias

    def loss_fn(params, head, batch, answer_bias):
      logits = logits_fn(params, head, batch["image"], batch["question"], answer_bias)
      return soft_cross_entropy(logits, batch["target"], batch["mask"])

    self._predict = jax.jit(lambda params, head, images, question, answer_bias: {
        "answer": jnp.argmax(logits_fn(params, head, images, question, answer_bias), axis=-1)})
    # One optimizer and one compiled step for every run and set (the learning rate is an input).
    self.finetuner = finetune.Finetuner(
        loss_fn, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, head_lr_mult=cfg.head_lr_mult, config_key="evals.<vqa>.learning_rate")

  @staticmethod
  def answer_bias(num_answers: int, width: int) -> jax.Array:
    """0 for the set's answers, -1e9 for the head's unused columns (out of softmax and argmax)."""
    return jnp.where(jnp.arange(width) < num_answers, 0.0, -1e9).astype(jnp.float32)

  def finetune(self, params, data: VqaData, question_ids: np.ndarray, num_answers: int, steps: int,
               seed: int = 0):
    """Returns (params, head) after `steps` AdamW steps on a copy (finetune.Finetuner)."""
    width, size = max(self.head_width, num_answers), self.image_size
    head = finetune.zero_head(self._features, width, params, jnp.zeros((1, size, size, 3)),
                              jnp.ones((1, 2), jnp.int32))
    towers = {"all": tuple(params), "decoder": ("text_decoder",), "head": ()}[self.cfg.train]

    def local_batch(rows):
      return {"image": data.images(data.image_index[rows], size), "question": question_ids[rows],
              "target": data.targets(rows, width)}

    return self.finetuner.train(params, head, towers, len(data), local_batch, steps, seed,
                                args=(self.answer_bias(num_answers, width),))

  def predict(self, params, head, data: VqaData, question_ids: np.ndarray, num_answers: int) -> np.ndarray:
    """Predicted answer index per question, int [Q] (among the first num_answers columns of the head)."""
    size = self.image_size
    answer_bias = self.answer_bias(num_answers, head["bias"].shape[-1])

    def transform(local):
      return {"image": data.images(local["image_index"], size), "question": local["question"]}

    batches = common.array_batches({"image_index": data.image_index, "question": question_ids}, self.batch_size,
                                   transform, common.data_sharding(params))
    out = common.collect(lambda b: self._predict(params, head, b["image"], b["question"], answer_bias), batches,
                         len(data))
    return out["answer"]


def vqa_accuracy(predicted: np.ndarray, data: VqaData) -> float:
  """Mean score of the predicted answers (exact match for one-hot data; VQAv2's min(1, k/3) otherwise)."""
  predicted = np.asarray(predicted)
  hit = data.answer_ids == predicted[:, None]
  return float(np.mean((hit * data.answer_scores).sum(axis=1)))


def default_config() -> ml_collections.ConfigDict:
  return evaluators.eval_config(
      "vqa", datasets=("scenes", "easy_vqa"), pool="mean", train="all", steps=300, batch_size=64,
      learning_rate=1e-4, weight_decay=0.05, warmup_steps=30, head_lr_mult=10.0, num_train=2000,
      max_train_questions=0, max_test_questions=0, seed=0,
      vqav2=ml_collections.ConfigDict(dict(
          train_questions="", train_annotations="", train_image_dir="",
          test_questions="", test_annotations="", test_image_dir="",
          image_pattern="COCO_{data_subtype}_{image_id:012d}.jpg", num_answers=3129)))


@evaluators.register("vqa", default_config)
class Vqa:
  """Fine-tuned VQA accuracy on each configured question set."""

  def __init__(self, model: SyCoCa, cfg: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
               prefix: str):
    self.model, self.cfg, self.prefix = model, cfg, prefix
    self.tokenizer = tokenizer_from_config(data_config)
    self.sets = []  # (name, train, test, vocabulary)
    for name in cfg.datasets:
      if name == "scenes":
        n_test = -(-cfg.max_test_questions // 4) if cfg.max_test_questions else 0
        train = load_scenes_vqa(data_config, "train", cfg.num_train)
        test = load_scenes_vqa(data_config, "test", n_test)
        vocabulary = scenes_lib.VQA_ANSWERS
      elif name == "easy_vqa":
        train, vocabulary = load_easy_vqa("train")
        test, _ = load_easy_vqa("test")
      elif name == "vqav2":
        v = cfg.vqav2
        train, vocabulary = load_vqav2(v.train_questions, v.train_annotations, v.train_image_dir, v.image_pattern,
                                       num_answers=v.num_answers)
        test, _ = load_vqav2(v.test_questions, v.test_annotations, v.test_image_dir, v.image_pattern,
                             vocabulary=vocabulary)
      else:
        raise ValueError(f"evals.{self.prefix}.datasets: unknown {name!r}; use scenes, easy_vqa, vqav2.")
      train, test = train.head(cfg.max_train_questions), test.head(cfg.max_test_questions)
      self.sets.append((name, train, self.tokenizer.encode(train.questions), test,
                        self.tokenizer.encode(test.questions), vocabulary))
    self.classifier = VqaClassifier(model, cfg, data_config.image_size,
                                    head_width=max(len(s[-1]) for s in self.sets))

  def run(self, params) -> dict[str, float]:
    out = {}
    for name, train, train_ids, test, test_ids, vocabulary in self.sets:
      tuned, head = self.classifier.finetune(params, train, train_ids, len(vocabulary), int(self.cfg.steps),
                                             self.cfg.seed)
      predicted = self.classifier.predict(tuned, head, test, test_ids, len(vocabulary))
      out[f"{self.prefix}/{name}_acc"] = vqa_accuracy(predicted, test)
    return out
