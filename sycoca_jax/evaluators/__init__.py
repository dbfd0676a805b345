"""Evaluators, looked up by name so that configs stay declarative, and built in one place.

`from_config(evals, model, data_config)` builds every entry of a run's config.evals (training and standalone
evaluation both call it); `build(model, eval_config, data_config)` builds one. The keys every eval config
carries are resolved there, once:
  type       the registered evaluator
  prefix     of its metric names (empty: the type), e.g. 'retrieval_coco'
  log_steps  its cadence during training (0: never), returned beside the evaluator
  per_device_batch_size  if > 0, the evaluator's global batch_size becomes this many examples per device (on a
             pod, a fixed global batch would leave each chip a row or two)
  data       overrides of the run's data config: a run that trains on CC12M evaluates retrieval on COCO with
             evals.retrieval_coco.data = {'name': 'coco_json', 'path': ...}; tokenizer and image size stay the
             run's unless overridden
The evaluator gets the rest: `Evaluator(model, cfg, data_config, prefix)`, cfg being its default config updated
with the eval config, builds everything that does not depend on the weights (data, tokenised texts, jitted
functions); `run(params) -> dict[str, float]` evaluates one set of weights, metrics named '<prefix>/<metric>'.

  def default_config():
    return evaluators.eval_config("retrieval", split="test", ...)

  @register("retrieval", default_config)
  class Retrieval: ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

_REGISTRY: dict[str, tuple[type, Callable[[], ml_collections.ConfigDict]]] = {}
# Modules that register evaluators; imported on first lookup so `import sycoca_jax.evaluators` stays cheap.
_MODULES = ("retrieval", "zeroshot", "probe", "vqa", "captioning", "masking")
SHARED_KEYS = ("type", "prefix", "log_steps", "data", "per_device_batch_size")


def eval_config(type_: str, **fields) -> ml_collections.ConfigDict:
  """An evaluator's default config: the shared keys (module docstring) with their defaults, and its own fields."""
  return ml_collections.ConfigDict(dict(type=type_, log_steps=0, prefix="", data=ml_collections.ConfigDict(),
                                        per_device_batch_size=0, **fields))


def register(name: str, default_config: Callable[[], ml_collections.ConfigDict]):
  """Class decorator: makes the evaluator available as `name`, with its default config."""

  def wrap(cls):
    if name in _REGISTRY and _REGISTRY[name][0] is not cls:
      raise ValueError(f"Evaluator {name!r} is registered twice.")
    _REGISTRY[name] = (cls, default_config)
    return cls

  return wrap


def metric_prefix(eval_config: ml_collections.ConfigDict) -> str:
  """The prefix of an eval config's metric names: its `prefix`, else its type."""
  return eval_config.get("prefix") or eval_config.type


def _lookup(name: str) -> tuple[type, Callable[[], ml_collections.ConfigDict]]:
  if name not in _REGISTRY:
    for module in _MODULES:
      importlib.import_module(f"{__name__}.{module}")
  if name not in _REGISTRY:
    raise ValueError(f"Unknown evaluator {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def from_config(evals: Mapping[str, ml_collections.ConfigDict], model, data_config: ml_collections.ConfigDict,
                scheduled_only: bool = False) -> list[tuple[str, Any, int]]:
  """(name, evaluator, log_steps) of every eval config in `evals` (a run's config.evals), in order.

  `scheduled_only` (the trainer's choice) leaves out evaluators whose log_steps is 0: they would never run, and
  building one already renders or loads its data.
  """
  built = []
  for name, config in evals.items():
    cls, default_config = _lookup(config.type)
    cfg = default_config()
    cfg.update(config)
    data = ml_collections.ConfigDict(data_config.to_dict())
    if cfg.data:
      data.update(cfg.data.to_dict())
    prefix, log_steps = metric_prefix(cfg), int(cfg.log_steps)
    if cfg.per_device_batch_size > 0:
      if "batch_size" not in cfg:
        raise ValueError(f"config.evals.{name}.per_device_batch_size: the {cfg.type} evaluator has no batch.")
      import jax  # pylint: disable=g-import-not-at-top
      cfg.batch_size = int(cfg.per_device_batch_size) * jax.device_count()
    if scheduled_only and not log_steps:
      continue
    for key in SHARED_KEYS:
      del cfg[key]
    built.append((name, cls(model, cfg, data, prefix), log_steps))
  return built


def build(model, eval_config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict):
  """One evaluator from its eval config (module docstring)."""
  [(_, evaluator, _)] = from_config({eval_config.type: eval_config}, model, data_config)
  return evaluator
