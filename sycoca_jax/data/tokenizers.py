"""Tokenizers behind one interface, looked up by name.

Every tokenizer turns a batch of captions into a fixed-width id matrix and back:

  encode(texts)  -> int32 [n, max_len]: bos, text ids, eos, then pad (id 0). A text too long for max_len is
                    cut and its last kept position replaced by eos, so every row ends its sentence (as
                    open_clip does); the model's causal text tower reads its CLS/eos from there.
  decode(ids)    -> list[str]: drops bos and pad, stops at the first eos.
  normalize(t)   -> str: the text that decode(encode(t)) gives back (when t fits in max_len).

Registered names (`get_tokenizer(name, **kw)`):
  "clip_bpe"      CLIP's byte-level BPE (vocabulary 49,408; sot 49406, eot 49407, pad 0), ids identical to
                  open_clip's SimpleTokenizer. The merges file ships in sycoca_jax/data/assets.
  "scenes_words"  a word-level vocabulary built from the built-in scenes' templates, for tiny configs.
  "sentencepiece" a SentencePiece model given by `path` (needs the optional `sentencepiece` package).
"""

from __future__ import annotations

import abc
import functools
import gzip
import html
import os
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CLIP_BPE_PATH = os.path.join(ASSETS_DIR, "bpe_simple_vocab_16e6.txt.gz")


class Tokenizer(abc.ABC):
  """Fixed-width text <-> id matrices. Subclasses supply `_encode_one`, `_decode_one` and `normalize`."""

  pad_id = 0

  def __init__(self, max_len: int, vocab_size: int, bos_id: int, eos_id: int):
    if max_len < 2:
      raise ValueError(f"max_len={max_len}: a row needs room for at least the start and end tokens.")
    self.max_len = max_len
    self.vocab_size = vocab_size
    self.bos_id = bos_id
    self.eos_id = eos_id

  @abc.abstractmethod
  def _encode_one(self, text: str) -> list[int]:
    """Ids of one text, without bos/eos."""

  @abc.abstractmethod
  def _decode_one(self, ids: list[int]) -> str:
    """Text of ids that hold neither bos, eos nor pad."""

  @abc.abstractmethod
  def normalize(self, text: str) -> str:
    """The text as the tokenizer sees it: what decode(encode(text)) returns for a text that fits."""

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    if isinstance(texts, str):
      raise TypeError("encode takes a sequence of texts; wrap a single caption in a list.")
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id, *self._encode_one(text), self.eos_id]
      if len(ids) > self.max_len:
        ids = ids[: self.max_len]
        ids[-1] = self.eos_id
      out[row, : len(ids)] = ids
    return out

  def num_tokens(self, text: str) -> int:
    """Length of the row `text` needs before truncation, bos and eos included."""
    return len(self._encode_one(text)) + 2

  def decode(self, ids) -> list[str]:
    ids = np.asarray(ids)
    if ids.ndim == 1:
      ids = ids[None]
    texts = []
    for row in ids.tolist():
      kept = []
      for i in row:
        if i == self.eos_id:
          break
        if i not in (self.bos_id, self.pad_id):
          kept.append(i)
      texts.append(self._decode_one(kept))
    return texts


# ------------------------------------------------------------------------------------------------ CLIP BPE


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  codes = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      codes.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, codes)))


# open_clip's pre-tokenizer: specials, English contractions, letter runs, single digits, other symbol runs.
_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")
_CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_PATTERN = regex.compile("|".join(_CLIP_SPECIALS) + "|" + _CLIP_WORDS, regex.IGNORECASE)


def clip_clean(text: str) -> str:
  """open_clip's clean='lower': fix mojibake, unescape html twice, collapse whitespace, lowercase."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).lower()


@functools.lru_cache(maxsize=4)
def _clip_vocab(bpe_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """CLIP's vocabulary: 256 byte symbols, the same with '</w>', one entry per merge, two specials."""
  with gzip.open(bpe_path) as f:
    lines = f.read().decode("utf-8").split("\n")
  merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
  symbols = list(_bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_CLIP_SPECIALS)
  return {token: i for i, token in enumerate(vocab)}, merges


class ClipBpeTokenizer(Tokenizer):
  """CLIP's BPE with open_clip's cleaning, run by the HuggingFace `tokenizers` BPE model.

  The Rust model reproduces SimpleTokenizer's merges exactly (checked against ids produced by open_clip in
  tests/fixtures/clip_bpe_ids.json) and is an order of magnitude faster than the Python merge loop. Python
  still does the cleaning and the regex split, so the two can not drift apart there.
  """

  def __init__(self, max_len: int = 77, bpe_path: str = CLIP_BPE_PATH):
    import tokenizers  # pylint: disable=g-import-not-at-top

    vocab, merges = _clip_vocab(bpe_path)
    super().__init__(max_len, len(vocab), vocab["<start_of_text>"], vocab["<end_of_text>"])
    model = tokenizers.models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>")
    self._bpe = tokenizers.Tokenizer(model)
    self._byte_encoder = _bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    self._id_to_token = {i: t for t, i in vocab.items()}
    self._vocab = vocab

  def _words(self, text: str) -> list[str]:
    return _CLIP_PATTERN.findall(clip_clean(text))

  def _encode_one(self, text: str) -> list[int]:
    ids = []
    for word in self._words(text):
      if word in _CLIP_SPECIALS:  # open_clip maps a literal special token in a caption to its id.
        ids.append(self._vocab[word])
        continue
      symbols = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
      ids.extend(self._bpe.encode(symbols).ids)
    return ids

  def _decode_one(self, ids: list[int]) -> str:
    symbols = "".join(self._id_to_token[i] for i in ids)
    text = bytes(self._byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
    return text.replace("</w>", " ").strip()

  def normalize(self, text: str) -> str:
    return " ".join(self._words(text))


# ------------------------------------------------------------------------------------------------ word level

_WORD_PATTERN = regex.compile(r"[\p{L}\p{N}]+|[^\s\p{L}\p{N}]")


class WordTokenizer(Tokenizer):
  """Whole lowercase words and single punctuation marks; anything else is `<unk>`.

  Ids: 0 pad, 1 bos, 2 eos, 3 unk, then the words in sorted order, so the same word list always gives the
  same ids.
  """

  SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

  def __init__(self, words: Sequence[str], max_len: int = 32):
    vocab = list(self.SPECIALS) + sorted(set(words) - set(self.SPECIALS))
    super().__init__(max_len, len(vocab), bos_id=1, eos_id=2)
    self.unk_id = 3
    self.words = vocab
    self._ids = {w: i for i, w in enumerate(vocab)}

  def _split(self, text: str) -> list[str]:
    return _WORD_PATTERN.findall(text.lower())

  def _encode_one(self, text: str) -> list[int]:
    return [self._ids.get(w, self.unk_id) for w in self._split(text)]

  def _decode_one(self, ids: list[int]) -> str:
    return " ".join(self.words[i] for i in ids)

  def normalize(self, text: str) -> str:
    return " ".join(w if w in self._ids else "<unk>" for w in self._split(text))


def scenes_word_tokenizer(max_len: int = 32) -> WordTokenizer:
  """Word tokenizer over every word the built-in scenes can produce (captions, questions, answers)."""
  from sycoca_jax.data import scenes  # pylint: disable=g-import-not-at-top

  return WordTokenizer(scenes.vocabulary(), max_len=max_len)


def scenes_noun_ids() -> tuple[int, ...]:
  """The built-in scenes' nouns (scenes.NOUNS) as ids of scenes_word_tokenizer."""
  from sycoca_jax.data import scenes  # pylint: disable=g-import-not-at-top

  return _scenes_word_ids(scenes.NOUNS)


def scenes_colour_ids() -> tuple[int, ...]:
  """The built-in scenes' colour words (scenes.COLOUR_VOCAB) as ids of scenes_word_tokenizer."""
  from sycoca_jax.data import scenes  # pylint: disable=g-import-not-at-top

  return _scenes_word_ids(scenes.COLOUR_VOCAB)


def _scenes_word_ids(names) -> tuple[int, ...]:
  words = scenes_word_tokenizer().words
  return tuple(words.index(w) for w in names)


# ------------------------------------------------------------------------------------------------ SentencePiece


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file. Id 0 must be the model's pad (or unused): rows are padded with 0."""

  def __init__(self, path: str, max_len: int = 64, bos_id: int | None = None, eos_id: int | None = None):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("The 'sentencepiece' tokenizer needs `pip install sentencepiece`.") from e
    if not os.path.exists(path):
      raise FileNotFoundError(f"SentencePiece model not found: {path!r}")
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    bos = self._sp.bos_id() if bos_id is None else bos_id
    eos = self._sp.eos_id() if eos_id is None else eos_id
    if bos < 0 or eos < 0:
      raise ValueError(f"{path} defines no bos/eos piece; pass bos_id= and eos_id= explicitly.")
    super().__init__(max_len, self._sp.get_piece_size(), bos, eos)

  def _encode_one(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def _decode_one(self, ids: list[int]) -> str:
    return self._sp.decode(ids)

  def normalize(self, text: str) -> str:
    return self._sp.decode(self._sp.encode(text))


# ------------------------------------------------------------------------------------------------ registry

_REGISTRY = {
    "clip_bpe": ClipBpeTokenizer,
    "scenes_words": scenes_word_tokenizer,
    "sentencepiece": SentencePieceTokenizer,
}


def get_tokenizer(name: str, **kw) -> Tokenizer:
  """Builds the tokenizer registered as `name`; kw go to its constructor (max_len=..., path=...)."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown tokenizer {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name](**kw)
