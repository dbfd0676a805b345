"""The captioning evaluator: COCO metrics as the toolkit computes them, scene-graph F1, one vs two processes."""

import json

import ml_collections
import numpy as np
import pytest

from sycoca_jax import evaluators
from sycoca_jax.data import default_data_config
from sycoca_jax.data import get_tokenizer
from sycoca_jax.data import load_eval_split
from sycoca_jax.evaluators import captioning
from sycoca_jax.models.sycoca import build_model
from sycoca_jax.tools.decode_benchmark import random_captioning_params
from tests import distributed
from tests.helpers import tiny_model_config

PREDICTIONS = {
    "a": "a red circle left of a blue star",
    "b": "two green squares.",
    "c": "a picture of a yellow 7 in the top left",
    "d": "",  # an empty caption must not break (or shift) anything
}
REFERENCES = {
    "a": ["a red circle to the left of a blue star", "a red disc left of a star", "a blue star"],
    "b": ["two squares", "two green boxes", "there are two green squares"],
    "c": ["a yellow 7 in the top left", "a yellow digit 7", "a picture of a yellow number 7"],
    "d": ["a white heart", "one heart", "a heart above a cross"],
}


def _direct(predictions, references, tokenization):
  """pycocoevalcap called directly, as the COCO caption toolkit does."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

  if tokenization == "ptb":
    tok = PTBTokenizer()
    res = tok.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
  else:
    res = {k: [captioning.simple_tokenize(v)] for k, v in predictions.items()}
    gts = {k: [captioning.simple_tokenize(c) for c in v] for k, v in references.items()}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return {"bleu_4": bleu[3], "bleu_1": bleu[0], "cider": Cider().compute_score(gts, res)[0],
          "rouge_l": Rouge().compute_score(gts, res)[0]}


@pytest.mark.parametrize("tokenization", ["ptb", "simple"])
def test_coco_metrics_equal_pycocoevalcap(tokenization):
  if tokenization == "ptb" and not captioning.java_available():
    pytest.skip("needs Java")
  ours = captioning.coco_caption_metrics(PREDICTIONS, REFERENCES, tokenization=tokenization, meteor=False)
  direct = _direct(PREDICTIONS, REFERENCES, tokenization)
  for key, value in direct.items():
    assert ours[key] == pytest.approx(value, rel=1e-12), key
  assert 0 < ours["cider"] and 0 < ours["bleu_4"] < 1
  assert "meteor" not in ours


def test_simple_tokenisation_matches_ptb_on_plain_captions():
  if not captioning.java_available():
    pytest.skip("needs Java")
  texts = {i: [c] for i, c in enumerate([*REFERENCES["a"], "Two GREEN squares, and a star!", "a 7... or a 1?"])}
  assert captioning.tokenize_for_scoring(texts, "ptb") == captioning.tokenize_for_scoring(texts, "simple")


@pytest.mark.slow(reason="starts METEOR's Java virtual machine: ~5 s")
def test_meteor_runs_when_java_is_there():
  if not captioning.java_available():
    pytest.skip("needs Java")
  preds = {"a": REFERENCES["a"][0], "b": "a purple heart"}
  refs = {"a": REFERENCES["a"], "b": REFERENCES["b"]}
  out = captioning.coco_caption_metrics(preds, refs, tokenization="simple", meteor=True)
  assert 0.3 < out["meteor"] < 1.0  # one exact match, one miss


def test_parse_mentions():
  assert captioning.parse_mentions("a small red circle left of two 7s") == [("red", "circle"), (None, "7")]
  assert captioning.parse_mentions("a big filled grey box, a violet digit 3 and a number 8") == [
      ("gray", "square"), ("purple", "3"), (None, "8")]
  assert captioning.parse_mentions("three blue objects above a shape") == [("blue", None)]
  assert captioning.parse_mentions("there are four shapes") == []
  assert captioning.parse_mentions("red hearts") == [("red", "heart")]


def test_scene_graph_f1_by_hand():
  graph = {"objects": [{"shape": "circle", "colour": "red"}, {"shape": "7", "colour": "blue"},
                       {"shape": "star", "colour": "green"}]}
  # 3 mentions: red circle (right), blue 7 (right), yellow star (wrong colour); recalls the circle and the 7.
  assert captioning.scene_graph_counts("a red circle above a blue 7 and a yellow star", graph) == (2, 3, 2, 3)
  # A mention with no colour matches any object of its kind.
  assert captioning.scene_graph_counts("two stars", graph) == (1, 1, 1, 3)
  assert captioning.scene_graph_counts("a picture of", graph) == (0, 0, 0, 3)
  out = captioning.scene_graph_f1(["a red circle above a blue 7 and a yellow star", "two stars"], [graph, graph])
  p, r = 3 / 4, 3 / 6
  assert out["sg_precision"] == pytest.approx(p) and out["sg_recall"] == pytest.approx(r)
  assert out["sg_f1"] == pytest.approx(2 * p * r / (p + r))


def test_reference_captions_have_perfect_scene_graph_precision():
  split = load_eval_split(default_data_config(), "test", 40)
  refs = [c for caps in split.captions for c in caps]
  graphs = [g for g, caps in zip(split.scene_graphs, split.captions) for _ in caps]
  out = captioning.scene_graph_f1(refs, graphs)
  assert out["sg_precision"] == 1.0 and 0.2 < out["sg_recall"] < 1.0


# ------------------------------------------------------------------------------------------------ the evaluator


def build_evaluator(**overrides):
  """The tiny captioner on 10 scenes at 32 px (two global batches of 8, the second padded); random weights."""
  data = default_data_config()
  data.update(image_size=32, max_len=12)
  vocab = get_tokenizer("scenes_words", max_len=12).vocab_size
  cfg = tiny_model_config(**{"text.vocab_size": vocab, "vision.depth": 1, "text.depth": 1})
  model = build_model(cfg)
  ev = ml_collections.ConfigDict(dict(type="captioning", split="test", max_examples=10, batch_size=8,
                                      sampler="beam", beam_size=2, meteor=False, tokenization="simple"))
  ev.update(overrides)
  return evaluators.build(model, ev, data), random_captioning_params(model, seed=1)


def two_process_target() -> dict:
  evaluator, params = build_evaluator()
  return {"metrics": evaluator.run(params), "captions": evaluator.last_predictions}


@pytest.mark.slow(reason="two processes over loopback, each compiling the captioner")
def test_evaluator_one_process_equals_two(tmp_path):
  def one_process():  # this process, 8 devices, while the two one-device workers run
    evaluator, params = build_evaluator(predictions_path=str(tmp_path / "pred.json"))
    return evaluator.run(params), evaluator.last_predictions

  (single, captions), workers = distributed.run_on_processes(
      "tests.test_captioning:two_process_target", tmp_path, while_waiting=one_process, timeout=300)
  keys = {f"captioning/{k}" for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "sg_precision",
                                      "sg_recall", "sg_f1", "mean_log_prob", "mean_length", "num_images")}
  assert set(single) == keys
  assert single["captioning/num_images"] == 10
  assert all(np.isfinite(v) for v in single.values())
  written = json.loads((tmp_path / "pred.json").read_text())
  assert [r["index"] for r in written] == list(range(10)) and written[3]["caption"] == captions[3]
  assert len(captions) == 10 and any(captions)
  for got in workers:
    assert got["devices"] == 2
    assert got["captions"] == captions
    assert set(got["metrics"]) == keys
    for k, v in single.items():
      assert got["metrics"][k] == pytest.approx(v, rel=1e-5), k


def test_unknown_sampler_is_refused():
  with pytest.raises(ValueError, match="sampler='nucleus'"):
    build_evaluator(sampler="nucleus")


# ------------------------------------------------------------------------------------------------ inference API


def test_inference_api():
  import jax

  from sycoca_jax import inference
  from sycoca_jax.data import pipeline
  tok = get_tokenizer("scenes_words", max_len=12)
  cfg = tiny_model_config(**{"text.vocab_size": tok.vocab_size, "vision.depth": 1, "text.depth": 1})
  params = random_captioning_params(build_model(cfg), seed=2)
  inf = inference.Inference(cfg, params, tok, batch_size=4)
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (5, 40, 48, 3)).astype(np.uint8)  # not square, not 32 px: resized and cropped

  emb = inf.embed_images(images)
  assert emb.shape == (5, cfg.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  # Same preprocessing as the evaluation pipeline, and float [0, 1] pixels mean the same as uint8.
  from PIL import Image
  x = np.stack([np.asarray(pipeline.resize_center_crop(Image.fromarray(im), 32)) for im in images])
  np.testing.assert_allclose(inf.embed_images(x, preprocessed=True), emb, atol=1e-5)
  np.testing.assert_allclose(inf.embed_images(images.astype(np.float32) / 255.0), emb, atol=1e-5)
  np.testing.assert_allclose(inf.embed_images(Image.fromarray(images[2])), emb[2:3], atol=1e-5)

  captions, log_probs = inf.caption(images, sampler="greedy", return_log_probs=True)
  assert len(captions) == 5 and all(isinstance(c, str) for c in captions) and log_probs.shape == (5,)
  # The sampler's log-probabilities are the teacher-forced likelihood of its own tokens.
  tokens = np.asarray(jax.device_get(inf._captioners[("greedy", 12, ())](params, x).tokens))
  assert tok.decode(tokens) == captions
  ll = inf._token_ll(params, x, tokens)["sum"]
  np.testing.assert_allclose(ll, log_probs, rtol=1e-5, atol=1e-5)

  texts = ["a red circle", "two blue stars", "a 7", "a green heart above a box", "one square"]
  scores = inf.score(images, texts)
  text_emb = inf.embed_texts(texts)
  np.testing.assert_allclose(scores["similarity"], np.sum(emb * text_emb, -1), atol=1e-5)
  temperature = np.exp(min(float(params["logit_scale"]), np.log(100.0)))
  np.testing.assert_allclose(scores["logit"], scores["similarity"] * temperature, rtol=1e-4)
  assert np.all(scores["log_likelihood"] < 0)
  one = inf.score(images[1], texts)  # one image against every text
  np.testing.assert_allclose(one["log_likelihood"][1], scores["log_likelihood"][1], rtol=1e-5)
  with pytest.raises(ValueError, match="5 images and 2 texts"):
    inf.score(images, texts[:2])


def test_inference_api_takes_one_string_paths_and_refuses_unscaled_float_images(tmp_path):
  from PIL import Image

  from sycoca_jax import inference
  tok = get_tokenizer("scenes_words", max_len=12)
  cfg = tiny_model_config(**{"text.vocab_size": tok.vocab_size, "vision.depth": 1, "text.depth": 1})
  inf = inference.Inference(cfg, random_captioning_params(build_model(cfg), seed=2), tok, batch_size=4)
  one = inf.embed_texts("a red circle")  # one text, not one per character
  assert one.shape == (1, cfg.embed_dim)
  np.testing.assert_allclose(one, inf.embed_texts(["a red circle", "two stars"])[:1], atol=1e-6)
  assert inf.score(np.zeros((40, 48, 3), np.uint8), "a red circle")["similarity"].shape == (1,)

  image = np.random.RandomState(0).randint(0, 256, (40, 48, 3)).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / "a.png")
  want = inf.embed_images(image)
  np.testing.assert_allclose(inf.embed_images(str(tmp_path / "a.png")), want, atol=1e-6)
  np.testing.assert_allclose(inf.embed_images([tmp_path / "a.png", image]), np.concatenate([want, want]), atol=1e-6)
  with pytest.raises(ValueError, match=r"Float images must be pixels in \[0, 1\]; got values in \[0, 25[0-5]\]"):
    inf.embed_images(image.astype(np.float32))
  with pytest.raises(FileNotFoundError):
    inf.embed_images(str(tmp_path / "missing.jpg"))
