"""Evaluators, looked up by name so that configs stay declarative.

Interface: `Evaluator(model, model_config, eval_config, data_config)` builds everything that does not depend
on the weights (data, tokenised texts, jitted functions); `run(params) -> dict[str, float]` evaluates one set
of weights. Metric names are prefixed with the evaluator's name, e.g. "retrieval/i2t_r1".

  @register("retrieval")
  class Retrieval: ...

  get_evaluator("retrieval")  -> the class
"""

import importlib

_REGISTRY: dict = {}
# Modules that register evaluators; imported on first lookup so `import sycoca_jax.evaluators` stays cheap.
_MODULES = ("retrieval", "zeroshot", "probe", "vqa", "captioning", "masking")


def register(name: str):
  """Class decorator: makes the evaluator available as `name`."""

  def wrap(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"Evaluator {name!r} is registered twice.")
    _REGISTRY[name] = cls
    return cls

  return wrap


def get_evaluator(name: str):
  """The evaluator class registered as `name`."""
  if name not in _REGISTRY:
    for module in _MODULES:
      try:
        importlib.import_module(f"{__name__}.{module}")
      except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{module}":
          raise
  if name not in _REGISTRY:
    raise ValueError(f"Unknown evaluator {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]
