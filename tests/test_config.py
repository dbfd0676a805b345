"""Config files and their arguments: typed from each file's defaults, typos refused, impossible values named."""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from configs import common
from sycoca_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_module(name):
  """configs/<name>.py loaded by path, as main.py's --config flag loads it."""
  spec = importlib.util.spec_from_file_location(f"_test_config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(name, arg=None):
  return config_module(name).get_config(arg)


def test_parse_arg_types_each_argument_from_its_default():
  defaults = dict(variant="sycoca", runlocal=False, steps=300, lr=0.5)
  assert common.parse_arg(None, **defaults) == defaults
  assert common.parse_arg("runlocal,variant=coca,steps=7,lr=2", **defaults) == dict(
      variant="coca", runlocal=True, steps=7, lr=2.0)
  for text, value in (("false", False), ("0", False), ("No", False), ("true", True), ("1", True), ("yes", True)):
    assert common.parse_arg(f"runlocal={text}", **defaults)["runlocal"] is value
  with pytest.raises(ValueError, match="runlocal='maybe'"):
    common.parse_arg("runlocal=maybe", **defaults)
  with pytest.raises(ValueError, match="steps='many'.*expected int"):
    common.parse_arg("steps=many", **defaults)
  with pytest.raises(ValueError, match="'variant' needs a value"):  # a bare key is True for a bool only
    common.parse_arg("variant", **defaults)


def test_unknown_config_argument_fails_with_did_you_mean():
  with pytest.raises(ValueError, match="'varient': unknown. Did you mean 'variant'.*takes: runlocal, variant"):
    common.parse_arg("varient=coca", variant="sycoca", runlocal=False)


@pytest.mark.parametrize("arg, message", [
    ("varient=coca", "Did you mean 'variant'"),
    ("runlokal", "Did you mean 'runlocal'"),
])
def test_sycoca_tiny_refuses_misspelt_arguments(arg, message):
  with pytest.raises(ValueError, match=message):
    load("sycoca_tiny", arg)


def test_runlocal_false_and_0_do_not_shrink_the_config():
  full = load("sycoca_tiny").total_steps
  assert load("sycoca_tiny", "runlocal=false").total_steps == full
  assert load("sycoca_tiny", "runlocal=0").total_steps == full
  assert load("sycoca_tiny", "runlocal").total_steps == 10
  assert load("sycoca_tiny", "variant=coca").loss.mim_weight == 0.0


def test_eval_split_val_points_every_scenes_evaluator_at_the_validation_twins():
  test, val = load("sycoca_tiny").evals, load("sycoca_tiny", "eval_split=val").evals
  assert {test[n].split for n in ("retrieval", "captioning", "masking")} == {"test"}
  assert {val[n].split for n in ("retrieval", "captioning", "masking")} == {"val"}
  assert val.zeroshot.datasets == ("scenes_shape_val", "scenes_colour_val", "scenes_digit_val", "sklearn_digits")
  assert test.zeroshot.datasets == ("scenes_shape", "scenes_colour", "scenes_digit", "sklearn_digits")
  from sycoca_jax.evaluators import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load("scenes_digit_val", load("sycoca_tiny").data)
  assert digits.name == "scenes_digit_val" and len(digits) == 500 and digits.class_names[7] == "7"
  with pytest.raises(ValueError, match="'eval_split': 'dev' is not one of test, val"):
    load("sycoca_tiny", "eval_split=dev")


@pytest.mark.parametrize("name", ["eval_all", "eval_probe", "eval_retrieval", "eval_zeroshot",
                                  "finetune_classification", "finetune_vqa"])
def test_eval_configs_take_their_own_arguments_and_refuse_typos(name):
  c = load(name, "runlocal,variant=coca")
  assert c.total_steps == 10 and c.loss.mim_weight == 0.0
  with pytest.raises(ValueError, match="Did you mean 'runlocal'"):
    load(name, "runlokal")


def test_each_eval_config_argument_reaches_the_config():
  assert load("eval_probe", "runlocal,features=tokens,every=7").evals.probe.features == "tokens"
  assert load("eval_retrieval", "every=7,coco=/c.json,coco_images=/img").evals.retrieval_coco.data.image_dir == "/img"
  assert load("eval_zeroshot", "tfds=imagenet2012,every=7").evals.zeroshot_tfds.log_steps == 7
  assert load("finetune_classification", "steps=20").evals.probe_finetune.finetune.steps == 20
  assert load("finetune_vqa", "vqav2=/v,steps=20").evals.vqa.datasets == ("vqav2",)
  with pytest.raises(ValueError, match="every='soon'"):
    load("eval_probe", "every=soon")


def test_captioning_config_arguments():
  c = load("captioning_coco", "init=/w,init_step=40")
  assert (c.init_from.workdir, c.init_from.step) == ("/w", 40)
  with pytest.raises(ValueError, match="Did you mean 'init_step'"):
    load("captioning_coco", "init_stpe=40")


def test_every_config_file_loads_with_runlocal():
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    if name not in ("__init__", "common"):  # the package's helpers, not config files
      load(name, "runlocal")


def test_pretraining_configs_offer_the_ablation_variants():
  for name in ("sycoca_tiny", "sycoca_base"):
    assert config_module(name).VARIANTS == tuple(common.VARIANTS)
  for variant, row in common.VARIANTS.items():
    c = load("sycoca_tiny", f"runlocal,variant={variant}")
    assert (c.loss.itc_weight, c.loss.ic_weight, c.loss.mim_weight) == row["weights"]
    assert c.model.masking.strategy == row["strategy"]
  with pytest.raises(ValueError, match="variant='cocaa' is not one of"):
    load("sycoca_tiny", "variant=cocaa")


def test_eval_configs_take_the_geometry_of_model():
  tiny, base = load("eval_zeroshot", "runlocal=0"), load("eval_zeroshot", "model=base")
  assert (tiny.model.vision.image_size, base.model.vision.image_size) == (48, 288)
  assert list(tiny.evals) == ["zeroshot"] and tiny.total_steps == load("sycoca_tiny").total_steps
  with pytest.raises(ValueError, match="model='huge': use model=tiny or model=base"):
    load("eval_zeroshot", "model=huge")


@pytest.mark.parametrize("key, value, message", [
    ("keep_ckpts", 0, r"config.keep_ckpts: 0 must be >= 1"),
    ("optim.lr", -1e-3, r"config.optim.lr: -0.001 must be positive"),
    ("optim.lr", 0.0, r"config.optim.lr: 0.0 must be positive"),
    ("optim.warmup_steps", -2, r"config.optim.warmup_steps: -2 must be >= 0"),
    ("optim.weight_decay", -0.1, r"config.optim.weight_decay: -0.1 must be >= 0"),
    ("total_steps", -5, r"config.total_steps: -5 is negative"),
    ("data.tokenizer", "clip_bpe", r"config.model.text.vocab_size: 119 is smaller than the vocabulary of "
                                   r"data.tokenizer='clip_bpe' \(49408\)"),
    ("loss.hard_negative_weight", -1.0, r"config.loss.hard_negative_weight: -1.0 is negative"),
    ("loss.hard_negative_weight", 0.5, r"config.loss.hard_negative_weight: 0.5 needs captions with false twins: "
                                       r"data.name='scenes' with data.scenes.hard_negatives"),
    ("loss.twin_text_weight", 1.0, r"config.loss.twin_text_weight: 1.0 needs captions with false twins"),
    ("loss.twin_columns_weight", 0.5, r"config.loss.twin_columns_weight: 0.5 needs captions with false twins"),
    ("loss.words_weight", 1.0, r"config.loss.words_weight: 1.0 trains the caption-words head: set "
                               r"model.words_head=True"),
    ("loss.words_vocab", "verbs", r"config.loss.words_vocab: 'verbs' is not one of 'all', 'nouns', 'nouns_colours'"),
    ("loss.words_softmax", "nouns", r"config.loss.words_softmax: 'nouns' is not one of 'all', 'vocab', 'groups'"),
    ("loss.words_softmax", "vocab", r"config.loss.words_softmax: 'vocab' runs the softmax over loss.words_vocab's "
                                    r"words, and words_vocab='all' is every word"),
    ("loss.words_softmax", "groups", r"config.loss.words_softmax: 'groups' runs the softmax over "
                                     r"loss.words_vocab's words, and words_vocab='all' is every word"),
    ("model.words_pool", "sum", r"config.model.words_pool: 'sum' is not one of 'mean', 'max'"),
    ("model.words_grad", "half", r"config.model.words_grad: 'half' is not one of 'full', 'centred'"),
    ("model.masking.score", "nouns", r"config.model.masking.score: 'nouns' ranks patches by the caption-words head: "
                                     r"set model.words_head=True"),
    ("loss.words_decay_steps", 100, r"config.loss.words_decay_steps: 100 decays the words weight, but "
                                    r"loss.words_weight is 0.0"),
    ("loss.words_decay_steps", -1, r"config.loss.words_decay_steps: -1 is negative"),
    ("model.masking.score", "words", r"config.model.masking.score: 'words' ranks patches by the caption-words head: "
                                     r"set model.words_head=True"),
    ("loss.token_weight", -1.0, r"config.loss.token_weight: -1.0 is negative"),
    ("model.vision.registers", -1, r"config.model.vision.registers: -1 must be an integer >= 0"),
    ("loss.token_loss", "dense", r"config.loss.token_loss: 'dense' is not one of 'sparc', 'filip', 'filip_text'"),
])
def test_validate_refuses_impossible_values_naming_the_key(key, value, message):
  config = load("sycoca_tiny", "runlocal")
  config.model.text.vocab_size = 119
  config_lib.validate(config)
  config_lib.set_by_path(config, key, value)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_the_token_loss_needs_patch_embeddings():
  config = load("sycoca_tiny", "runlocal")
  config.model.vision.pool, config.model.masking.strategy = "attn", "random"
  config_lib.validate(config)
  config.loss.token_weight = 1.0
  with pytest.raises(ValueError, match=r"config.loss.token_weight: 1.0 scores caption tokens against patch embeddings, "
                                       r"and model.vision.pool='attn' has none"):
    config_lib.validate(config)


@pytest.mark.parametrize("vocab", ["nouns", "nouns_colours"])
def test_the_scenes_word_vocabularies_need_the_scenes_tokenizer(vocab):
  config = load("sycoca_tiny", "runlocal")
  config.model.words_head = True
  config.loss.update(words_weight=1.0, words_vocab=vocab)
  config_lib.validate(config)
  config.data.tokenizer = "byte"
  with pytest.raises(ValueError, match=rf"config.loss.words_vocab: '{vocab}' are the built-in scenes' words, in the "
                                       r"'scenes_words' tokenizer's ids; data.tokenizer is 'byte'"):
    config_lib.validate(config)


# Terms whose means run over the whole batch, which micro-batches would split: each refuses grad_accum_steps > 1.
BATCH_WIDE = {
    "centred_words": ({"model.words_head": True, "model.words_grad": "centred", "loss.words_weight": 1.0,
                       "loss.words_vocab": "nouns"},
                      r"config.model.words_grad: 'centred' takes the gradient's mean over the batch, and gradient "
                      r"accumulation splits it \(grad_accum_steps=2\)"),
    "filip": ({"loss.token_weight": 1.0, "loss.token_loss": "filip"},
              r"config.loss.token_loss: 'filip' scores each caption against the whole batch's images, which gradient "
              r"accumulation does not split"),
    "filip_text": ({"loss.token_weight": 1.0, "loss.token_loss": "filip_text"},
                   r"config.loss.token_loss: 'filip_text' scores each caption against the whole batch's images"),
    "twin_columns": ({"data.scenes.hard_negatives": ("object",), "loss.twin_columns_weight": 0.5},
                     r"config.loss.twin_columns_weight: 0.5 scores each image against the whole batch's twins, which "
                     r"gradient accumulation does not split"),
}


@pytest.mark.parametrize("name", sorted(BATCH_WIDE))
def test_batch_wide_terms_refuse_gradient_accumulation(name):
  overrides, message = BATCH_WIDE[name]
  config = load("sycoca_tiny", "runlocal")
  for key, value in overrides.items():
    config_lib.set_by_path(config, key, value)
  config_lib.validate(config)
  config.grad_accum_steps = 2
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_twin_scenes_need_the_scenes_an_even_batch_and_no_other_hard_negatives():
  config = load("sycoca_tiny", "runlocal")
  config.data.scenes.twins = True
  config_lib.validate(config)
  for key, value, message in (("global_batch_size", 15, "needs an even global_batch_size"),
                              ("data.scenes.hard_negatives", ("object",), r"pairs .*, without data.scenes.hard_negatives"),
                              ("data.name", "coco_json", r"pairs the built-in scenes \(data.name='scenes'\)")):
    changed = config.copy_and_resolve_references()
    config_lib.set_by_path(changed, key, value)
    with pytest.raises(ValueError, match=rf"config.data.scenes.twins: {message}"):
      config_lib.validate(changed)


def test_negative_epochs_and_examples_are_refused():
  for key, value in (("total_epochs", -1.0), ("total_examples", -64)):
    config = load("sycoca_tiny", "runlocal")
    config.total_steps = 0
    config.num_train_examples = 100
    config_lib.set_by_path(config, key, value)
    with pytest.raises(ValueError, match=f"config.{key}: -"):
      config_lib.validate(config)


@pytest.mark.parametrize("override, message", [
    ("--config.optim.learning_rate=1", r"--config.optim.learning_rate: unknown config key 'learning_rate'\. "
                                       r"config.optim has: b1, .*lr,"),
    ("--config.optim.lrr=1", r"unknown config key 'lrr'\. Did you mean --config.optim.lr\?"),
])
def test_unknown_override_ends_in_one_line(tmp_path, override, message):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), f"--config={ROOT}/configs/sycoca_tiny.py",
                        f"--workdir={tmp_path / 'w'}", override], capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and re.search(message, lines[0]), out.stderr
  assert not (tmp_path / "w").exists()


def test_a_key_added_to_the_schema_after_saving_is_no_change_at_its_default():
  config = config_lib.default_config()
  saved = json.loads(json.dumps(config.to_dict(), default=str))
  del saved["model"]["remat_policy"], saved["max_param_norm_growth"]   # keys older code did not have
  assert config_lib.resume_changes(saved, config) == ([], [], [])
  config.model.remat_policy = "dots"   # the same new key away from its default is a change of the model
  refused, _, _ = config_lib.resume_changes(saved, config)
  assert refused == ["model.remat_policy (<unset> -> dots)"]
