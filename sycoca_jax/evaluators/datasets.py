"""Labelled image sets for the classification evaluators (zero-shot, linear probe, fine-tuning).

An `ImageSet` is either small raw images held in memory (uint8, any size, grey or RGB; converted to the
model's normalised S x S RGB batch by batch, so only the originals stay in memory) or an EvalSplit of the data
layer (decoded on demand). Either way it yields padded, masked global batches (see common.py).

Sets that work offline, from data that pip packages ship (defined in data/sources.py):
  sklearn_digits   1,797 handwritten digits, 8 x 8, dark ink on white, 10 classes
  lfw_subset       200 grey 25 x 25 crops, 100 faces then 100 non-faces (scikit-image), 2 classes
  scenes_shape / scenes_colour / scenes_digit   the built-in one-object zero-shot splits
  scenes_shape_val / scenes_colour_val / scenes_digit_val   their validation twins
  scenes_count     the number of objects (1-4) in built-in scenes (train: 'train', test: 'test')
and, where prepared on disk, any TFDS classification set: 'tfds:<name>' or 'tfds:<name>:<split>'.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from sycoca_jax.data import pipeline
from sycoca_jax.data import scenes as scenes_lib
from sycoca_jax.data import sources
from sycoca_jax.evaluators import common

_SCENES_ZEROSHOT = {"scenes_shape": "zeroshot_shape", "scenes_colour": "zeroshot_colour",
                    "scenes_digit": "zeroshot_digit"}
# Their validation twins (scenes_shape_val, ...): to tune on, reported under names of their own.
_SCENES_ZEROSHOT |= {name + scenes_lib.VAL_SUFFIX: split + scenes_lib.VAL_SUFFIX
                     for name, split in _SCENES_ZEROSHOT.items()}


class ImageSet:
  """Labelled images: raw arrays in memory, or an EvalSplit. See the module docstring."""

  def __init__(self, name: str, labels: np.ndarray, class_names: Sequence[str],
               templates: Sequence[str] = sources.PHOTO_TEMPLATES, *, raw: np.ndarray | None = None,
               split: pipeline.EvalSplit | None = None, image_size: int = 0, cache: bool = True):
    if (raw is None) == (split is None):
      raise ValueError("An ImageSet holds either raw images or an EvalSplit.")
    self.name, self.labels = name, np.asarray(labels, np.int32)
    self.class_names, self.templates = tuple(class_names), tuple(templates)
    self.raw, self.split, self.image_size, self.cache = raw, split, image_size, cache
    self._cached: dict[int, common.CachedSplitImages] = {}

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices: np.ndarray, name: str | None = None) -> ImageSet:
    if self.raw is None:
      raise ValueError(f"{self.name}: subsets of a streamed split are not supported; use separate splits.")
    return ImageSet(name or self.name, self.labels[indices], self.class_names, self.templates,
                    raw=self.raw[indices], image_size=self.image_size)

  def images(self, indices: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S, 3] of the given examples (for training loops that sample rows)."""
    if self.raw is not None:
      return common.images_from_arrays(self.raw[np.asarray(indices)], self.image_size)
    return np.stack([self.split.image(int(i)) for i in indices])

  def batches(self, global_batch_size: int, extras: Mapping[str, np.ndarray] | None = None,
              sharding: jax.sharding.NamedSharding | None = None) -> Iterator[dict[str, jax.Array]]:
    """Global batches {'image', 'index', 'mask', **extras}; extras are indexed by example."""
    if self.split is not None:
      if global_batch_size not in self._cached:
        self._cached[global_batch_size] = common.CachedSplitImages(self.split, global_batch_size, self.cache)
      yield from self._cached[global_batch_size].iterate(extras, sharding)
      return
    arrays = {"raw": self.raw} | dict(extras or {})
    size = self.image_size

    def transform(local):
      local = dict(local)
      local["image"] = common.images_from_arrays(local.pop("raw"), size)
      return local

    yield from common.array_batches(arrays, global_batch_size, transform, sharding)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) indices with every class split in the same proportion; deterministic in seed."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(len(idx) * test_fraction))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def scenes_config(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's data config pointed at the built-in scenes (same image size and tokenizer)."""
  base = pipeline.default_data_config()
  cfg = ml_collections.ConfigDict(data_config.to_dict())
  if cfg.name != "scenes":
    cfg.name = "scenes"
    cfg.seed = base.seed
    cfg.scenes = base.scenes
  return cfg


def scenes_count(data_config: ml_collections.ConfigDict, split: str, max_examples: int) -> ImageSet:
  """Built-in scenes labelled with their number of objects: class c = c + 1 objects."""
  cfg = scenes_config(data_config)
  if split == "train":
    cfg.scenes.num_train = max_examples or 2000
  eval_split = pipeline.load_eval_split(cfg, split, max_examples)
  labels = np.asarray([len(g["objects"]) - 1 for g in eval_split.scene_graphs], np.int32)
  return ImageSet(f"scenes_count_{split}", labels, scenes_lib.NUMBER_WORDS[1:], split=eval_split)


def load(name: str, data_config: ml_collections.ConfigDict, *, max_examples: int = 0,
         class_names: Sequence[str] | None = None) -> ImageSet:
  """A labelled set by name (module docstring): sklearn_digits, lfw_subset, scenes_*, tfds:<name>[:<split>]."""
  if name in ("sklearn_digits", "lfw_subset"):
    source = sources.OFFLINE_SPLITS[name]()
    out = ImageSet(name, source.labels, source.class_names, source.templates, raw=source.images,
                   image_size=data_config.image_size)
  elif name in _SCENES_ZEROSHOT:
    split = pipeline.load_eval_split(scenes_config(data_config), _SCENES_ZEROSHOT[name], max_examples)
    return ImageSet(name, split.labels, split.class_names, split.templates, split=split)
  elif name.startswith("tfds:"):
    _, tfds_name, *rest = name.split(":")
    cfg = ml_collections.ConfigDict(data_config.to_dict())
    cfg.update(name="tfds", tfds_name=tfds_name)
    split = pipeline.load_eval_split(cfg, rest[0] if rest else "test", max_examples)
    names = class_names or split.class_names
    if split.labels is None or not names:
      raise ValueError(f"TFDS dataset {tfds_name!r} has no 'label' feature with class names; give class_names.")
    return ImageSet(name.replace(":", "_"), split.labels, names, sources.PHOTO_TEMPLATES, split=split)
  else:
    raise ValueError(f"Unknown image set {name!r}: use sklearn_digits, lfw_subset, "
                     f"{', '.join(_SCENES_ZEROSHOT)}, scenes_count or tfds:<name>[:<split>].")
  if max_examples and max_examples < len(out):
    # A class-balanced slice (sklearn's digits are not ordered by class, lfw_subset is).
    keep, _ = stratified_split(out.labels, 1.0 - max_examples / len(out), seed=0)
    out = out.subset(keep[:max_examples])
  return out
