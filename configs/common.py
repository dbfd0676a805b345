"""What the config files share: their typed arguments, the paper's ablation rows, `runlocal`, evaluation presets.

A config file starts with `args = common.parse_arg(arg, name=default, ...)`: every argument it takes, typed from
its default, and nothing else (a misspelt one stops the run with a "did you mean"). The eval and fine-tune
configs start from a pretraining config of the checkpoint's geometry with `eval_run_config`.
"""

import difflib
import importlib
from collections.abc import Mapping
from typing import Any, Optional

import ml_collections

from sycoca_jax import config_lib
from sycoca_jax.data import default_data_config, get_tokenizer
from sycoca_jax.evaluators import captioning, masking, retrieval, zeroshot


def parse_arg(arg: Optional[str], **defaults: Any) -> dict[str, Any]:
  """A config file's argument string, typed from its defaults: every default, with the given ones replaced.

  parse_arg('variant=coca,runlocal', variant='sycoca', runlocal=False) -> {'variant': 'coca', 'runlocal': True}.
  A bool takes true/false, 1/0, yes/no, or its bare name for True; an int, float or str argument needs a value.
  An argument the config file does not declare is refused (with a "did you mean"): a typo must not silently
  run the default, e.g. an ablation row launched as `varient=coca` would train and report the wrong variant.
  """
  out = dict(defaults)
  for name, value in config_lib.split_arg(arg).items():
    if name not in defaults:
      near = difflib.get_close_matches(name, list(defaults), n=1)
      hint = f" Did you mean {near[0]!r}?" if near else ""
      known = ", ".join(sorted(defaults)) or "none"
      raise ValueError(f"config argument {name!r}: unknown.{hint} This config file takes: {known}.")
    default = defaults[name]
    if isinstance(default, bool):
      out[name] = config_lib.to_bool(value, name)
      continue
    if value is None:
      raise ValueError(f"config argument {name!r} needs a value ({name}=...); its default is {default!r}.")
    if not isinstance(default, (int, float, str)):
      raise ValueError(f"config argument {name!r}: default {default!r} of type {type(default).__name__} "
                       "cannot be parsed; declare an int, float, str or bool default.")
    try:
      out[name] = type(default)(value)
    except ValueError:
      raise ValueError(f"config argument {name}={value!r}: expected {type(default).__name__} "
                       f"(default {default!r}).") from None
  return out


# ------------------------------------------------------------------------------------------------ variants

# The paper's ablation rows (its Table of component contributions), as config edits, in table order. A config
# that takes `variant=` exposes these names as its VARIANTS, which python -m sycoca_jax.tools.ablation reads.
VARIANTS = {
    "clip": dict(weights=(1.0, 0.0, 0.0), strategy="none", ic_ratio=0.0, mim_ratio=0.0),
    "coca": dict(weights=(1.0, 2.0, 0.0), strategy="none", ic_ratio=0.0, mim_ratio=0.0),
    "coca_am": dict(weights=(1.0, 2.0, 0.0), strategy="attentive", ic_ratio=0.5, mim_ratio=0.0),
    "coca_mim_image_only": dict(weights=(1.0, 2.0, 1.0), strategy="attentive", ic_ratio=0.5, mim_ratio=0.5,
                                cross_attention=False),
    "coca_tgmim_random": dict(weights=(1.0, 2.0, 1.0), strategy="random", ic_ratio=0.5, mim_ratio=0.5),
    "sycoca": dict(weights=(1.0, 2.0, 1.0), strategy="attentive", ic_ratio=0.5, mim_ratio=0.5),
}


def apply_variant(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets the objectives and masking of one ablation row (see VARIANTS)."""
  if name not in VARIANTS:
    raise ValueError(f"variant={name!r} is not one of {sorted(VARIANTS)}.")
  v = VARIANTS[name]
  config.loss.itc_weight, config.loss.ic_weight, config.loss.mim_weight = v["weights"]
  config.model.masking.update(strategy=v["strategy"], ic_ratio=v["ic_ratio"], mim_ratio=v["mim_ratio"])
  config.model.image_decoder.cross_attention = v.get("cross_attention", True)
  return config


# ------------------------------------------------------------------------------------------------ runlocal


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to a smoke run on the built-in scenes data: tiny towers, a few steps, CPU-sized batch."""
  c = config
  c.model.vision.update(image_size=32, patch_size=8, width=32, depth=2, heads=2, attn_pooler_queries=5,
                        stem_channels=(8, 8, 16, 16, 16))  # the patch_cnn / conv stems' widths
  c.model.text.update(vocab_size=min(c.model.text.vocab_size, 49408), context_length=16, width=32, depth=2, heads=2)
  c.model.text_decoder.update(width=32, depth=1, heads=2)
  c.model.image_decoder.update(width=32, depth=1, heads=2)
  c.model.embed_dim = 32
  data = default_data_config()
  data.update(image_size=32, max_len=16, tokenizer="scenes_words")
  c.data = data
  c.model.text.vocab_size = get_tokenizer("scenes_words", max_len=16).vocab_size
  c.mesh.update(data=-1, fsdp=1)
  c.global_batch_size = 16
  c.grad_accum_steps = 1
  c.total_steps, c.total_epochs, c.total_examples = 10, 0.0, 0
  c.log_steps, c.ckpt_steps, c.image_log_steps = 5, 10, 0
  c.optim.warmup_steps = 2
  for ev in c.evals.values():
    ev.log_steps = 0
  return c


# ------------------------------------------------------------------------------------------------ evals


EVAL_SPLITS = ("test", "val")


def default_evals(every: int, split: str = "test") -> ml_collections.ConfigDict:
  """The evaluators a pretraining run reports as it goes, on the built-in scenes (fast, no download).

  Retrieval with fine-grained negatives, zero-shot classification, greedy captioning on 200 test scenes, and
  mask quality (does attentive masking keep the caption's objects for IC?) on 200 test scenes. split='val': the
  scenes' validation twins instead (the zero-shot sets as scenes_shape_val, ...), to tune on.
  """
  if split not in EVAL_SPLITS:
    raise ValueError(f"config argument 'eval_split': {split!r} is not one of {', '.join(EVAL_SPLITS)}.")
  evals = ml_collections.ConfigDict()
  evals.retrieval = retrieval.default_config()
  evals.zeroshot = zeroshot.default_config()
  evals.captioning = captioning.default_config()
  evals.captioning.update(sampler="greedy", max_examples=200, meteor=False)
  evals.masking = masking.default_config()
  evals.masking.update(max_examples=200)
  for ev in evals.values():
    ev.log_steps = every
    ev.data = ml_collections.ConfigDict(dict(name="scenes"))
  if split == "val":
    for ev in (evals.retrieval, evals.captioning, evals.masking):
      ev.split = "val"
    evals.zeroshot.datasets = tuple(f"{d}_val" if d.startswith("scenes_") else d for d in evals.zeroshot.datasets)
  return evals


# The pretraining configs an eval config can take its geometry from (model=).
_MODELS = {"tiny": "sycoca_tiny", "base": "sycoca_base"}


def base_run_config(name: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """get_config(arg) of configs/<name>.py: how eval configs reuse a model's geometry."""
  return importlib.import_module(f"configs.{name}").get_config(arg)


def eval_run_config(arg: Optional[str], evals: Mapping[str, ml_collections.ConfigDict],
                    **defaults: Any) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The shared start of the eval / fine-tune configs: the run config of `model=` (tiny | base; default tiny)
  with `runlocal` and `variant` passed on, and its evals replaced by `evals`.

  `defaults` are the calling config file's own arguments (e.g. every=1000); with model, runlocal and variant
  they are all it accepts (parse_arg: typed from the defaults, an unknown one refused). Returns
  (config, parsed args).
  """
  args = parse_arg(arg, model="tiny", runlocal=False, variant="sycoca", **defaults)
  model = args["model"]
  if model not in _MODELS:
    raise ValueError(f"model={model!r}: use model=tiny or model=base (the checkpoint's geometry).")
  c = base_run_config(_MODELS[model], f"runlocal={args['runlocal']},variant={args['variant']}")
  c.evals = ml_collections.ConfigDict({k: ml_collections.ConfigDict(v) for k, v in evals.items()})
  return c, args
