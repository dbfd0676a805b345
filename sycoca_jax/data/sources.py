"""Random-access data sources: raw records of every supported dataset behind one protocol.

A source has `len(source)`, `source[i]` (a raw record) and `source.annotations(i)` (the record without its
image, cheap). A raw record is a dict with
  one of 'image' (uint8 [H, W, C] array), 'image_bytes' (encoded) or 'image_path'   decoded by the pipeline
  'captions'  list[str] (may be empty for classification sets)
  'id'        int, the record's index
  'label'     int, for classification sets (then `source.class_names` lists the classes)

Datasets (data_config.name):
  scenes                  the built-in compositional scenes (scenes.ScenesSource)
  coco_json               a COCO captions annotation file or a Karpathy split file (dataset_coco.json,
                          dataset_flickr30k.json) with an image folder: COCO Karpathy splits and Flickr30k
  tfds                    a TFDS dataset prepared in array_record format, read with tfds.data_source:
                          coco_captions (Karpathy splits, 5 captions per image), imagenet2012 and other
                          classification sets
  webdataset_array_record image-text pairs converted from img2dataset's webdataset shards (webdataset.py)

Evaluation sets that pip packages ship (OFFLINE_SPLITS), reachable under any data config by split name:
  sklearn_digits (1,797 8x8 digits, labels), lfw_subset (200 faces / non-faces), easy_vqa_train / easy_vqa_test
  (shapes VQA, question/answer pairs per image). These are their only definitions: the classification and VQA
  evaluators read the same arrays (sklearn_digits(), lfw_subset(), EasyVqaSource).

A missing or empty dataset fails at start-up with an error that says what was looked for and where.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from sycoca_jax import paths as paths_lib
from sycoca_jax.data import scenes as scenes_lib
from sycoca_jax.data import webdataset


# Prompt templates of the offline classification sets (zero-shot): CLIP-style photo prompts, and for
# handwritten digits the built-in scenes' own digit prompts.
PHOTO_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
DIGIT_TEMPLATES = scenes_lib.ZEROSHOT["zeroshot_digit"][1]


class BadExample(Exception):
  """A record that can not be used; `reason` names the counter it is skipped under."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


class Source(Protocol):

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict:
    ...

  def annotations(self, index: int) -> dict:
    ...


# ------------------------------------------------------------------------------------------------ COCO / Karpathy


class CocoJsonSource:
  """Images listed in a caption annotation file, read from `image_dir`.

  Two layouts are recognised:
    COCO captions   {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}; the file is
                    the split.
    Karpathy split  {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}; `split` picks
                    images, and "train" includes "restval" as in Karpathy & Fei-Fei's setup.
  """

  def __init__(self, annotation_file: str, image_dir: str, split: str):
    if not paths_lib.resolve(annotation_file).exists():
      raise FileNotFoundError(f"Caption annotation file not found: {annotation_file!r} (data_config.path).")
    with paths_lib.resolve(annotation_file).open() as f:
      data = json.load(f)
    if "annotations" in data:
      self._items = self._coco_items(data)
    elif data.get("images") and "sentences" in data["images"][0]:
      self._items = self._karpathy_items(data, split)
    else:
      raise ValueError(f"{annotation_file} is neither a COCO captions file (images + annotations) nor a "
                       "Karpathy split file (images with sentences).")
    if not self._items:
      raise ValueError(f"{annotation_file} lists no images for split {split!r}.")
    self._image_dir = image_dir
    self._name = f"{annotation_file}:{split}"

  @staticmethod
  def _coco_items(data: dict) -> list[tuple[str, list[str]]]:
    captions = {}
    for ann in data["annotations"]:
      captions.setdefault(ann["image_id"], []).append(ann["caption"])
    images = sorted(data["images"], key=lambda im: im["id"])
    return [(im["file_name"], captions.get(im["id"], [])) for im in images]

  @staticmethod
  def _karpathy_items(data: dict, split: str) -> list[tuple[str, list[str]]]:
    wanted = {"train", "restval"} if split == "train" else {split}
    return [(os.path.join(im.get("filepath", ""), im["filename"]), [s["raw"] for s in im["sentences"]])
            for im in data["images"] if im["split"] in wanted]

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> dict:
    path, captions = self._items[index]
    return {"image_path": os.path.join(self._image_dir, path), "captions": list(captions), "id": index}

  def annotations(self, index: int) -> dict:
    return {"captions": list(self._items[index][1])}

  def __repr__(self) -> str:
    return f"CocoJsonSource({self._name}, {len(self)} images)"


# ------------------------------------------------------------------------------------------------ TFDS


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource:
  """A TFDS dataset prepared in array_record format, read through `tfds.data_source` (random access).

  Images are left encoded (SkipDecoding) so the pipeline decodes them like every other source. Captions
  come from 'captions' (coco_captions: a sequence of {'text', 'id'}) or 'caption'; labels from 'label'.
  """

  def __init__(self, name: str, split: str, data_dir: str = ""):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    if not name:
      raise ValueError("data_config.tfds_name is empty: name the TFDS dataset, e.g. 'coco_captions'.")
    where = data_dir or "TFDS' default data_dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
    missing = lambda reason: FileNotFoundError(
        f"TFDS dataset {name!r} split {split!r} could not be opened under {where}: {reason}. Prepare it there "
        f"with `tfds build {name} --file_format=array_record`.")
    # A local data_dir without the dataset's folder fails here, in milliseconds: opening it through TFDS first
    # imports TensorFlow (seconds) to describe the dataset's features.
    folder = os.path.join(data_dir, name.partition(":")[0].partition("/")[0]) if data_dir else ""
    if folder and not paths_lib.is_url(folder) and not os.path.isdir(folder):
      raise missing(f"no folder {folder}")
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                  decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # TFDS raises several types (not found, not array_record, bad split)
      raise missing(e) from e
    if len(self._ds) == 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty.")
    self._name = f"{name}:{split}"
    info = getattr(self._ds, "dataset_info", None)
    label = info.features["label"] if info is not None and "label" in info.features else None
    self.class_names = tuple(label.names) if label is not None and hasattr(label, "names") else None

  @staticmethod
  def _captions(example: dict) -> list[str]:
    if "captions" in example:
      captions = example["captions"]
      texts = captions["text"] if isinstance(captions, dict) else captions
      return [_text(t) for t in texts]
    if "caption" in example:
      return [_text(example["caption"])]
    return []

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict:
    example = self._ds[index]
    record = {"image_bytes": example["image"], "captions": self._captions(example), "id": index}
    if "label" in example:
      record["label"] = int(example["label"])
    return record

  def annotations(self, index: int) -> dict:
    record = self[index]
    del record["image_bytes"], record["id"]
    return record

  def __repr__(self) -> str:
    return f"TfdsSource({self._name}, {len(self)} examples)"


# ------------------------------------------------------------------------------------------------ array_record


class ArrayRecordSource:
  """Image-text records written by `python -m sycoca_jax.data.webdataset` (see webdataset.py)."""

  def __init__(self, pattern: str):
    import grain  # pylint: disable=g-import-not-at-top

    paths = paths_lib.glob(pattern)  # local files or gs://: array_record reads Cloud Storage itself
    if not paths:
      raise FileNotFoundError(
          f"No .array_record files match {pattern!r}. Convert img2dataset shards with `python -m "
          f"sycoca_jax.data.webdataset --input='shards/*.tar' --output=DIR` and set data_config.path to "
          f"'DIR/*.array_record'.")
    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) == 0:
      raise ValueError(f"The {len(paths)} files matching {pattern!r} hold no records.")
    self._name = pattern

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    try:
      record = webdataset.parse_record(self._records[index])
    except ValueError as e:
      raise BadExample("corrupt_record", str(e)) from e
    return {"image_bytes": record["image_bytes"], "captions": record["captions"], "id": index}

  def annotations(self, index: int) -> dict:
    try:
      return {"captions": webdataset.parse_record(self._records[index])["captions"]}
    except ValueError:
      return {"captions": []}

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self._name!r}, {len(self)} records)"


# ------------------------------------------------------------------------------------------------ offline sets


class ArraySource:
  """A small labelled set held in memory: uint8 images [N, H, W] (grey) or [N, H, W, 3] and int labels [N].

  The arrays are public: the classification evaluators read them whole, the pipeline record by record.
  """

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
               templates: Sequence[str]):
    self.name, self.images, self.labels = name, images, np.asarray(labels, np.int32)
    self.class_names, self.templates = tuple(class_names), tuple(templates)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "captions": [], "id": index, "label": int(self.labels[index])}

  def annotations(self, index: int) -> dict:
    return {"label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"ArraySource({self.name}, {len(self)} images)"


def sklearn_digits(ink: str = "dark") -> ArraySource:
  """scikit-learn's 1,797 handwritten 8x8 digits (its copy of the UCI set), labels 0-9.

  ink='dark': black strokes on white, as the scenes draw digits; 'light': the original bright strokes on black.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  grey = digits.images / 16.0  # 0 background .. 1 ink
  if ink == "dark":
    grey = 1.0 - grey
  elif ink != "light":
    raise ValueError(f"ink={ink!r}: use 'dark' or 'light'.")
  images = np.round(grey * 255).astype(np.uint8)
  return ArraySource("sklearn_digits", images, digits.target, scenes_lib.DIGITS, DIGIT_TEMPLATES)


def lfw_subset() -> ArraySource:
  """scikit-image's lfw_subset: 200 grey 25x25 crops, 100 faces (label 1) then 100 non-faces (label 0)."""
  import skimage.data  # pylint: disable=g-import-not-at-top

  images = np.round(np.clip(skimage.data.lfw_subset(), 0, 1) * 255).astype(np.uint8)
  labels = np.r_[np.ones(100, np.int32), np.zeros(len(images) - 100, np.int32)]
  return ArraySource("lfw_subset", images, labels, ("something else", "face"), PHOTO_TEMPLATES)


class EasyVqaSource:
  """The easy-vqa package's shapes VQA set (its data ships in the wheel): 64x64 images, several single-word
  answer questions each.

  Images are in sorted id order. Besides the source protocol (annotations: an image's (question, answer) pairs),
  every question in the package's order: `questions`, `question_answers` and `question_image` (the position of
  its image); `answers` is the answer vocabulary.
  """

  def __init__(self, split: str):
    import easy_vqa  # pylint: disable=g-import-not-at-top

    get_questions, get_paths = {"train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
                                "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths)}[split]
    questions, answers, image_ids = get_questions()
    self._paths = get_paths()
    self._ids = sorted(self._paths)
    position = {image_id: k for k, image_id in enumerate(self._ids)}
    self.questions, self.question_answers = list(questions), list(answers)
    self.question_image = np.asarray([position[i] for i in image_ids], np.int32)
    self._qa = [[] for _ in self._ids]
    for question, answer, k in zip(self.questions, self.question_answers, self.question_image):
      self._qa[k].append((question, answer))
    self.answers = tuple(easy_vqa.get_answers())

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, index: int) -> dict:
    return {"image_path": self._paths[self._ids[index]], "captions": [], "id": index}

  def annotations(self, index: int) -> dict:
    return {"qa": list(self._qa[index])}

  def __repr__(self) -> str:
    return f"EasyVqaSource({len(self)} images)"


# Evaluation sets that pip packages ship: available under any data config, by split name.
OFFLINE_SPLITS = {
    "sklearn_digits": sklearn_digits,
    "lfw_subset": lfw_subset,
    "easy_vqa_train": lambda: EasyVqaSource("train"),
    "easy_vqa_test": lambda: EasyVqaSource("test"),
}


class HeadSource:
  """The first n records of a source (same protocol), for evaluating on a slice."""

  def __init__(self, source: Source, n: int):
    self._source, self._n = source, min(n, len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self._n:
      raise IndexError(index)
    return self._source[index]

  def annotations(self, index: int) -> dict:
    return self._source.annotations(index)

  def __getattr__(self, name):  # class_names, templates, scene(), ...
    return getattr(self._source, name)


# ------------------------------------------------------------------------------------------------ dispatch


def build_source(data_config, split: str) -> Source:
  """The configured dataset's `split` as a random-access source (see the module docstring for names)."""
  if split in OFFLINE_SPLITS:
    return OFFLINE_SPLITS[split]()
  name = data_config.name
  if name == "scenes":
    sc = data_config.scenes
    return scenes_lib.ScenesSource(
        split, seed=data_config.seed, image_size=data_config.image_size, num_captions=sc.num_captions,
        num_examples=(sc.num_train or None) if split == "train" else None, min_objects=sc.min_objects,
        max_objects=sc.max_objects, backgrounds=tuple(sc.backgrounds),
        hard_negatives=tuple(sc.get("hard_negatives", ())) if split == "train" else (),
        twins=bool(sc.get("twins", False)) and split == "train")
  if name == "coco_json":
    return CocoJsonSource(data_config.path.format(split=split), data_config.image_dir, split)
  if name == "tfds":
    return TfdsSource(data_config.tfds_name, split, data_config.get("data_dir", ""))
  if name == "webdataset_array_record":
    if split == data_config.get("split", "train"):
      return ArrayRecordSource(data_config.path)
    if not data_config.get("eval_path"):
      raise ValueError(f"Split {split!r} of webdataset_array_record data needs data_config.eval_path (a glob "
                       "of held-out .array_record files).")
    return ArrayRecordSource(data_config.eval_path)
  raise ValueError(f"Unknown dataset {name!r}; known: scenes, coco_json, tfds, webdataset_array_record.")
