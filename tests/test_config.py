"""Config files and their arguments: typed from each file's defaults, typos refused, impossible values named."""

import glob
import importlib.util
import os

import pytest

from sycoca_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"_test_config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_parse_arg_types_each_argument_from_its_default():
  defaults = dict(variant="sycoca", runlocal=False, steps=300, lr=0.5)
  assert config_lib.parse_arg(None, **defaults) == defaults
  assert config_lib.parse_arg("runlocal,variant=coca,steps=7,lr=2", **defaults) == dict(
      variant="coca", runlocal=True, steps=7, lr=2.0)
  for text, value in (("false", False), ("0", False), ("No", False), ("true", True), ("1", True), ("yes", True)):
    assert config_lib.parse_arg(f"runlocal={text}", **defaults)["runlocal"] is value
  with pytest.raises(ValueError, match="runlocal='maybe'"):
    config_lib.parse_arg("runlocal=maybe", **defaults)
  with pytest.raises(ValueError, match="steps='many'.*expected int"):
    config_lib.parse_arg("steps=many", **defaults)
  with pytest.raises(ValueError, match="'variant' needs a value"):  # a bare key is True for a bool only
    config_lib.parse_arg("variant", **defaults)


def test_unknown_config_argument_fails_with_did_you_mean():
  with pytest.raises(ValueError, match="'varient': unknown. Did you mean 'variant'.*takes: runlocal, variant"):
    config_lib.parse_arg("varient=coca", variant="sycoca", runlocal=False)


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
    load(os.path.basename(path)[:-3], "runlocal")
