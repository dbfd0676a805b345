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

A missing or empty dataset fails at start-up with an error that says what was looked for and where.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Protocol

from sycoca_jax.data import scenes as scenes_lib
from sycoca_jax.data import webdataset


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
    if not os.path.exists(annotation_file):
      raise FileNotFoundError(f"Caption annotation file not found: {annotation_file!r} (data_config.path).")
    with open(annotation_file) as f:
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
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (imports TensorFlow: slow)

    if not name:
      raise ValueError("data_config.tfds_name is empty: name the TFDS dataset, e.g. 'coco_captions'.")
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                  decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # TFDS raises several types (not found, not array_record, bad split)
      where = data_dir or "TFDS' default data_dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
      raise FileNotFoundError(
          f"TFDS dataset {name!r} split {split!r} could not be opened under {where}: {e}. Prepare it there "
          f"with `tfds build {name} --file_format=array_record`.") from e
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

    paths = sorted(glob.glob(pattern))
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


# ------------------------------------------------------------------------------------------------ dispatch


def build_source(data_config, split: str) -> Source:
  """The configured dataset's `split` as a random-access source (see the module docstring for names)."""
  name = data_config.name
  if name == "scenes":
    sc = data_config.scenes
    return scenes_lib.ScenesSource(
        split, seed=data_config.seed, image_size=data_config.image_size, num_captions=sc.num_captions,
        num_examples=(sc.num_train or None) if split == "train" else None, min_objects=sc.min_objects,
        max_objects=sc.max_objects)
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
