"""A tiny random SyCoCa and a 32 px scenes data config, shared by the evaluator tests and their worker."""

import functools

import jax
import numpy as np

from sycoca_jax.data import default_data_config
from sycoca_jax.data import get_tokenizer
from sycoca_jax.models.sycoca import build_model
from sycoca_jax.models.sycoca import init_params
from tests.conftest import tiny_model_config

MAX_LEN = 16


def data_config():
  cfg = default_data_config()
  cfg.update(image_size=32, max_len=MAX_LEN, num_threads=1)
  return cfg


@functools.lru_cache(maxsize=None)
def tiny_model():
  """(model, model_config, params): one layer per tower, so the evaluators' programs compile in seconds."""
  vocab = get_tokenizer("scenes_words", max_len=MAX_LEN).vocab_size
  cfg = tiny_model_config(**{"text.vocab_size": vocab, "text.context_length": MAX_LEN, "vision.depth": 1,
                             "text.depth": 1, "text_decoder.depth": 1})
  model = build_model(cfg)
  return model, cfg, random_params(model)


def random_params(model, seed=0):
  """Parameters of init_params' shapes, drawn on the host: N(0, 0.05) weights, unit norm scales, zero biases.

  Tracing the init (eval_shape) without compiling or running it keeps every test that needs "a random model"
  from paying for the init program, which covers all four towers and costs more than the evaluators.
  """
  abstract = jax.eval_shape(lambda rng: init_params(model, rng), jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(leaf.shape, leaf.dtype)
    if name.endswith("['bias']"):
      return np.zeros(leaf.shape, leaf.dtype)
    if name.endswith("['logit_scale']"):
      return np.full(leaf.shape, np.log(1 / 0.07), leaf.dtype)
    return (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)
