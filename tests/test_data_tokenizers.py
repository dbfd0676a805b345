"""Tokenizers: CLIP BPE ids identical to open_clip, round trips, truncation, registry."""

import json
import os

import numpy as np
import pytest

from sycoca_jax.data import tokenizers

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip_bpe_ids.json")


@pytest.fixture(scope="module")
def clip77():
  return tokenizers.get_tokenizer("clip_bpe", max_len=77)


def test_clip_bpe_ids_equal_open_clip(clip77):
  with open(FIXTURE) as f:
    fixture = json.load(f)
  clip16 = tokenizers.get_tokenizer("clip_bpe", max_len=16)
  assert (clip77.vocab_size, clip77.bos_id, clip77.eos_id, clip77.pad_id) == (49408, 49406, 49407, 0)
  assert fixture["vocab_size"] == clip77.vocab_size
  cases = {77: [c for c in fixture["cases"] if c["context_length"] == 77],
           16: [c for c in fixture["cases"] if c["context_length"] == 16]}
  assert len(cases[77]) > 300
  rows = clip77.encode([c["text"] for c in cases[77]])
  for case, row in zip(cases[77], rows):
    assert row[row != 0].tolist() == case["ids"], case["text"]
  rows = clip16.encode([c["text"] for c in cases[16]])
  for case, row in zip(cases[16], rows):  # full rows: padding and truncation that keeps eot
    assert row.tolist() == case["ids"], case["text"]


@pytest.mark.parametrize("text", [
    "a red circle left of a blue star", "Hello, World!  It's 3.14 &amp; café", "two squares", "日本語 😀", ""])
def test_clip_decode_encode_round_trips_normalised_text(clip77, text):
  assert clip77.decode(clip77.encode([text])) == [clip77.normalize(text)]


def test_truncation_keeps_end_token_and_decode_stops_there():
  tok = tokenizers.get_tokenizer("clip_bpe", max_len=8)
  ids = tok.encode(["one two three four five six seven eight nine ten", "hi"])
  assert ids.dtype == np.int32 and ids.shape == (2, 8)
  assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
  assert tok.decode(ids[:1]) == ["one two three four five six"]
  assert ids[1].tolist() == [tok.bos_id, *tok.encode(["hi"])[0, 1:2].tolist(), tok.eos_id] + [0] * 5
  garbage_after_eos = ids[1].copy()
  garbage_after_eos[4:] = 320
  assert tok.decode(garbage_after_eos) == ["hi"]
  with pytest.raises(TypeError):
    tok.encode("not a list")


def test_word_tokenizer_is_deterministic_and_round_trips():
  a = tokenizers.get_tokenizer("scenes_words", max_len=16)
  b = tokenizers.get_tokenizer("scenes_words", max_len=16)
  assert a.words == b.words and (a.pad_id, a.bos_id, a.eos_id) == (0, 1, 2)
  text = "A red circle, left of two blue 7s?"
  ids = a.encode([text])
  assert ids[0, 0] == a.bos_id and a.unk_id not in ids
  assert a.decode(ids) == [a.normalize(text)] == ["a red circle , left of two blue 7s ?"]
  assert a.decode(a.encode(["a zebra"])) == ["a <unk>"]
  assert a.encode(["a"] * 40).shape == (40, 16)


def test_registry():
  with pytest.raises(ValueError, match="Unknown tokenizer"):
    tokenizers.get_tokenizer("nope")


def test_sentencepiece(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(f"a red circle left of a blue star number {i}" for i in range(200)))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=40,
                                 pad_id=0, unk_id=1, bos_id=2, eos_id=3)
  tok = tokenizers.get_tokenizer("sentencepiece", path=str(tmp_path / "m.model"), max_len=32)
  ids = tok.encode(["a red circle"])
  assert ids[0, 0] == tok.bos_id == 2 and tok.eos_id in ids[0]
  assert tok.decode(ids) == ["a red circle"]
