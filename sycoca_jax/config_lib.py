"""The run config: its defaults, one validation pass before anything compiles, and durations in any unit.

A config file in configs/ starts from `default_config()` and overrides what it needs; `validate` then rejects
unknown keys (with a "did you mean") and impossible values, naming the key, before any device work starts.
What config files share beyond the schema (typed arguments, the ablation variants, `runlocal`, evaluation
presets) lives with them, in configs/common.py.
"""

import difflib
import json
from typing import Any, Optional

import ml_collections

from sycoca_jax import losses, optim
from sycoca_jax.data import default_data_config, tokenizer_from_config
from sycoca_jax.models import sycoca


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = sycoca.default_model_config()
  c.loss = losses.default_loss_config()
  c.optim = optim.default_optim_config()
  c.data = default_data_config()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding_rules = ()          # ((pattern, 'fsdp' | 'replicate'), ...), first match wins; default 'fsdp'
  c.global_batch_size = 2048
  c.grad_accum_steps = 1         # micro-batches per step; contrastive negatives still span the global batch
  # Duration: exactly one of total_steps / total_epochs / total_examples (epochs need config.num_train_examples).
  c.total_steps = 0
  c.total_epochs = 0.0
  c.total_examples = 0
  c.num_train_examples = 0
  c.log_steps = 50               # scalar metrics (every log_steps steps and at the last step)
  c.image_log_steps = 1000       # mask / reconstruction images; 0 = never
  c.ckpt_steps = 1000            # checkpoint cadence (and always at the last step)
  c.keep_ckpts = 3
  c.async_checkpointing = True
  c.max_bad_steps = 5            # stop after this many non-finite steps in a row (each is skipped)
  # Stop rather than checkpoint weights whose norm grew by more than this factor since the last checkpoint
  # (a finite loss can still take a blown-up update); 0 turns the check off.
  c.max_param_norm_growth = 10.0
  # A SIGTERM to any host: every host saves the step they agree on and exits 0; a host that has not exited this
  # many seconds after its SIGTERM (a peer died, a collective hangs) ends itself. A second SIGTERM ends it at once.
  c.preemption_grace_s = 300.0
  c.preemption_check_steps = 1   # how often the hosts check (one round trip to the coordinator) for a SIGTERM
  # JAX's persistent compilation cache: "" = JAX_COMPILATION_CACHE_DIR if set, else workdir/compilation_cache.
  c.compilation_cache_dir = ""
  c.profile_steps = ()           # (first, last): a profiler trace of these steps in workdir/profile
  c.init_from = ml_collections.ConfigDict(dict(workdir="", step=-1, towers=()))
  c.evals = ml_collections.ConfigDict()   # name -> ConfigDict(type=..., log_steps=..., ...)
  return c


def _check_keys(config, reference, prefix="config"):
  """Unknown keys -> ValueError with the closest known key. Free-form subtrees (evals) are not checked."""
  for key in config.keys():
    if key not in reference:
      near = difflib.get_close_matches(key, list(reference.keys()), n=1)
      hint = f" Did you mean {prefix}.{near[0]}?" if near else ""
      raise ValueError(f"{prefix}.{key}: unknown config key.{hint}")
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict) and isinstance(value, ml_collections.ConfigDict):
      if len(ref) or key != "evals":
        _check_keys(value, ref, f"{prefix}.{key}")


def validate(config: ml_collections.ConfigDict, device_count: Optional[int] = None) -> None:
  """Raises ValueError naming the offending key; called before any compilation."""
  _check_keys(config, default_config())
  sycoca.validate_model_config(config.model)
  losses.enabled_heads(config.loss)

  def fail(key, msg):
    raise ValueError(f"config.{key}: {msg}")

  if config.loss.mim_weight > 0 and config.model.masking.mim_ratio <= 0:
    fail("loss.mim_weight", f"{config.loss.mim_weight} switches TG-MIM on, but model.masking.mim_ratio="
         f"{config.model.masking.mim_ratio} hides no patch for it to rebuild.")
  if config.loss.words_weight > 0 and not config.model.words_head:
    fail("loss.words_weight", f"{config.loss.words_weight} trains the caption-words head: set model.words_head=True.")
  if config.loss.words_decay_steps and config.loss.words_weight <= 0:
    fail("loss.words_decay_steps", f"{config.loss.words_decay_steps} decays the words weight, but loss.words_weight "
         f"is {config.loss.words_weight}.")
  if config.loss.token_weight > 0 and config.model.vision.pool == "attn":
    fail("loss.token_weight", f"{config.loss.token_weight} scores caption tokens against patch embeddings, and "
         "model.vision.pool='attn' has none.")
  if config.model.masking.score in ("words", "nouns") and config.loss.words_weight <= 0:
    fail("model.masking.score", f"{config.model.masking.score!r} ranks patches by the caption-words head, which only "
         "loss.words_weight > 0 trains.")
  if config.model.masking.score == "nouns" and config.data.tokenizer != "scenes_words":
    fail("model.masking.score", f"'nouns' are the built-in scenes' nouns, in the 'scenes_words' tokenizer's ids; "
         f"data.tokenizer is {config.data.tokenizer!r}.")
  if config.loss.words_vocab != "all" and config.data.tokenizer != "scenes_words":
    fail("loss.words_vocab", f"{config.loss.words_vocab!r} are the built-in scenes' words, in the 'scenes_words' "
         f"tokenizer's ids; data.tokenizer is {config.data.tokenizer!r}.")
  if config.model.words_grad == "centred" and config.loss.words_weight > 0 and config.grad_accum_steps > 1:
    fail("model.words_grad", f"'centred' takes the gradient's mean over the batch, and gradient accumulation splits "
         f"it (grad_accum_steps={config.grad_accum_steps}).")
  if config.loss.token_weight > 0 and config.loss.token_loss != "sparc" and config.grad_accum_steps > 1:
    fail("loss.token_loss", f"{config.loss.token_loss!r} scores each caption against the whole batch's images, "
         "which gradient accumulation does not split; use grad_accum_steps=1 or token_loss='sparc'.")
  if config.loss.twin_columns_weight > 0 and config.grad_accum_steps > 1:
    fail("loss.twin_columns_weight", f"{config.loss.twin_columns_weight} scores each image against the whole batch's "
         f"twins, which gradient accumulation does not split (grad_accum_steps={config.grad_accum_steps}).")
  for key in losses.TWIN_WEIGHTS:
    weight = config.loss[key]
    if weight < 0:
      fail(f"loss.{key}", f"{weight} is negative; use 0 to switch it off.")
    if weight > 0 and config.loss.itc_weight <= 0:
      fail(f"loss.{key}", f"{weight} needs the contrastive head (loss.itc_weight is 0).")
    if weight > 0 and not (config.data.name == "scenes" and config.data.scenes.hard_negatives):
      fail(f"loss.{key}", f"{weight} needs captions with false twins: data.name='scenes' with "
           "data.scenes.hard_negatives, e.g. ('object',).")
  if config.data.get("scenes", {}).get("twins", False):
    if config.data.name != "scenes" or config.data.scenes.hard_negatives:
      fail("data.scenes.twins", "pairs the built-in scenes (data.name='scenes'), without data.scenes.hard_negatives.")
    if config.global_batch_size % 2:
      fail("data.scenes.twins", f"needs an even global_batch_size (pairs of scenes), not {config.global_batch_size}.")
  if config.data.image_size != config.model.vision.image_size:
    fail("data.image_size", f"{config.data.image_size} differs from model.vision.image_size="
         f"{config.model.vision.image_size}.")
  if config.data.max_len != config.model.text.context_length:
    fail("data.max_len", f"{config.data.max_len} differs from model.text.context_length="
         f"{config.model.text.context_length}.")
  if config.global_batch_size <= 0:
    fail("global_batch_size", "must be positive.")
  if config.grad_accum_steps < 1 or config.global_batch_size % config.grad_accum_steps:
    fail("grad_accum_steps", f"{config.grad_accum_steps} must be >= 1 and divide global_batch_size="
         f"{config.global_batch_size}.")
  if device_count is not None:
    micro = config.global_batch_size // config.grad_accum_steps
    if micro % device_count:
      fail("global_batch_size", f"{config.global_batch_size} (micro-batch {micro}) is not divisible by the "
           f"{device_count} devices.")
  set_durations = [k for k in ("total_steps", "total_epochs", "total_examples") if config[k]]
  if len(set_durations) != 1:
    fail("total_steps", f"set exactly one of total_steps / total_epochs / total_examples (got {set_durations}).")
  if config.total_epochs and not config.num_train_examples:
    fail("num_train_examples", "is needed to count config.total_epochs in steps.")
  for key in ("total_steps", "total_epochs", "total_examples", "num_train_examples"):
    if config[key] < 0:
      fail(key, f"{config[key]} is negative: a duration counts forward (0 means unset).")
  if config.max_bad_steps < 1:
    fail("max_bad_steps", "must be >= 1.")
  if config.max_param_norm_growth < 0 or 0 < config.max_param_norm_growth <= 1:
    fail("max_param_norm_growth", f"{config.max_param_norm_growth} must be > 1 (or 0: no check).")
  # keep_ckpts=0 would let the checkpoint manager delete every checkpoint, old ones included.
  if config.keep_ckpts < 1:
    fail("keep_ckpts", f"{config.keep_ckpts} must be >= 1 (checkpoints kept in the workdir).")
  if config.ckpt_steps < 0:
    fail("ckpt_steps", f"{config.ckpt_steps} must be >= 0 (0: only at the last step).")
  # A negative learning rate trains uphill without any error; a zero one trains nothing.
  if config.optim.lr <= 0:
    fail("optim.lr", f"{config.optim.lr} must be positive.")
  for key in ("warmup_steps", "weight_decay", "end_lr_fraction"):
    if config.optim[key] < 0:
      fail(f"optim.{key}", f"{config.optim[key]} must be >= 0.")
  if config.preemption_check_steps < 1:
    fail("preemption_check_steps", f"{config.preemption_check_steps} must be >= 1.")
  if config.preemption_grace_s <= 0:
    fail("preemption_grace_s", f"{config.preemption_grace_s} must be positive (seconds).")
  if config.profile_steps and not (len(config.profile_steps) == 2 and 1 <= config.profile_steps[0]
                                   <= config.profile_steps[1]):
    fail("profile_steps", f"{config.profile_steps} must be () or (first, last) with 1 <= first <= last.")
  _check_tokenizer_fits(config, fail)
  for name, ev in config.evals.items():
    if "type" not in ev:
      fail(f"evals.{name}.type", "missing: name the evaluator to run.")


def _check_tokenizer_fits(config: ml_collections.ConfigDict, fail) -> None:
  """Token ids past the model's vocabulary index outside its embedding table: NaN, not an error, under jit."""
  try:
    vocab = tokenizer_from_config(config.data).vocab_size
  except (OSError, ImportError):
    return  # a tokenizer file that is missing here (e.g. on a remote workdir) is reported when data loads
  if vocab > config.model.text.vocab_size:
    fail("model.text.vocab_size", f"{config.model.text.vocab_size} is smaller than the vocabulary of "
         f"data.tokenizer={config.data.tokenizer!r} ({vocab}): set model.text.vocab_size >= {vocab}.")


# What a resumed run may not change: the parameter shapes and tree (model geometry, layer scan), the objective
# and masking (the ablation variant), and the optimizer's tree (frozen towers). Compute-only model settings may.
_RESUME_FREE_MODEL_KEYS = ("model.dtype", "model.attention_impl", "model.remat", "model.init_logit_scale")
_SCHEDULE_KEYS = ("total_steps", "total_epochs", "total_examples", "num_train_examples", "global_batch_size",
                  "optim.lr", "optim.warmup_steps", "optim.end_lr_fraction")


def resume_changes(saved: dict, config: ml_collections.ConfigDict) -> tuple[list[str], list[str], list[str]]:
  """Keys whose value differs between a checkpoint's saved config and the run resuming it, as 'key (old -> new)'.

  Returns (refused, schedule, other): changes of the model geometry or the variant, which the checkpoint cannot
  be restored into or which would make the run a different experiment; changes of the run's length or
  learning-rate schedule; anything else (cadences, evals, data paths, ...).
  """
  # Through JSON, as the checkpoint stored it, so that a tuple and the list it was saved as compare equal.
  old, new = flatten(saved), flatten(json.loads(json.dumps(config.to_dict(), default=str)))
  added = keys_added_at_default(old, new)
  refused, schedule, other = [], [], []
  for key in sorted(set(old) | set(new)):
    if old.get(key, "<unset>") == new.get(key, "<unset>") or key in added:
      continue
    change = f"{key} ({old.get(key, '<unset>')} -> {new.get(key, '<unset>')})"
    if ((key.startswith("model.") and key not in _RESUME_FREE_MODEL_KEYS) or key.startswith("loss.")
        or key == "optim.freeze"):
      refused.append(change)
    elif key in _SCHEDULE_KEYS:
      schedule.append(change)
    else:
      other.append(change)
  return refused, schedule, other


def keys_added_at_default(saved: dict[str, Any], current: dict[str, Any]) -> set[str]:
  """Keys of `current` that `saved` predates and that hold the schema's default (both flat, through JSON).

  A key added to the schema after a run was saved defaults to the behaviour the run had, so it is no change.
  """
  defaults = flatten(json.loads(json.dumps(default_config().to_dict(), default=str)))
  return {k for k, v in current.items() if k not in saved and k in defaults and defaults[k] == v}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}: a nested config dict keyed by dotted paths."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def total_steps(config: ml_collections.ConfigDict) -> int:
  """The run's length in steps, from whichever unit the config gave."""
  if config.total_steps:
    return int(config.total_steps)
  examples = config.total_examples or config.total_epochs * config.num_train_examples
  return max(1, int(round(examples / config.global_batch_size)))


def every(step: int, cadence: int, last_step: int) -> bool:
  """True on multiples of `cadence` (> 0) and at the last step. Step numbers count finished updates."""
  return step == last_step or (cadence > 0 and step % cadence == 0)


def set_by_path(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config['a']['b']['c'] = value for key 'a.b.c'; an unknown key raises ValueError naming it."""
  node = config
  *path, last = key.split(".")
  for p in path:
    if p not in node:
      raise ValueError(f"{key}: unknown config key {p!r}.")
    node = node[p]
  if last not in node:
    raise ValueError(f"{key}: unknown config key {last!r}.")
  node[last] = value


def split_arg(arg: Optional[str]) -> dict[str, Optional[str]]:
  """'variant=coca,runlocal' -> {'variant': 'coca', 'runlocal': None}, untyped and unchecked.

  The syntax of the `:arg` after a config file's path. Config files type and check their arguments from it
  (configs/common.py: parse_arg); tools use it to rewrite or inspect an argument string they pass on.
  """
  out: dict[str, Optional[str]] = {}
  for token in filter(None, (arg or "").split(",")):
    key, eq, value = token.partition("=")
    out[key.strip()] = value.strip() if eq else None
  return out


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def to_bool(value: Optional[str], name: str) -> bool:
  """A bool config argument: a bare key (None) or true/1/yes -> True, false/0/no -> False (any case)."""
  if value is None or value.lower() in _TRUE:
    return True
  if value.lower() in _FALSE:
    return False
  raise ValueError(f"config argument {name}={value!r}: expected true/false, 1/0 or yes/no.")
