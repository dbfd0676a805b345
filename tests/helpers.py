"""What several test modules share: tiny model and training configs, random batches and weights, eval data.

Imported by the tests and by the worker processes they start (tests/train_worker.py, tests/distributed.py
targets), so importing it sets nothing up: conftest.py alone fakes the eight CPU devices.
"""

import functools
import importlib.util
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from sycoca_jax import config_lib
from sycoca_jax.data import default_data_config
from sycoca_jax.data import get_tokenizer
from sycoca_jax.models.sycoca import build_model
from sycoca_jax.models.sycoca import default_model_config
from sycoca_jax.models.sycoca import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------------------


def tiny_model_config(**overrides):
  """A 32 px, 2-layer geometry (16 patches) that compiles in seconds on CPU."""
  c = default_model_config()
  c.embed_dim = 24
  c.vision.update(image_size=32, patch_size=8, width=32, depth=2, heads=4)
  c.text.update(vocab_size=64, context_length=12, width=32, depth=2, heads=4)
  c.text_decoder.update(width=32, depth=2, heads=4)
  c.image_decoder.update(width=16, depth=1, heads=2)
  for key, value in overrides.items():
    config_lib.set_by_path(c, key, value)
  return c


def random_batch(cfg, b=3, seed=0):
  """(images [B, P, P, 3], text [B, L]) for a model config: row i is a caption of 4 + i tokens, then padding."""
  rng = np.random.RandomState(seed)
  size, length = cfg.vision.image_size, cfg.text.context_length
  images = rng.randn(b, size, size, 3).astype(np.float32)
  text = np.zeros((b, length), np.int32)
  for i in range(b):
    n = 4 + i
    text[i, 0] = 1
    text[i, 1:n - 1] = rng.randint(3, cfg.text.vocab_size, n - 2)
    text[i, n - 1] = 2
  return jnp.asarray(images), jnp.asarray(text)


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


# ---------------------------------------------------------------------------------------------------------
# Evaluators: a tiny random SyCoCa and a 32 px scenes data config.
# ---------------------------------------------------------------------------------------------------------

EVAL_MAX_LEN = 16


def eval_data_config():
  cfg = default_data_config()
  cfg.update(image_size=32, max_len=EVAL_MAX_LEN, num_threads=1)
  return cfg


@functools.lru_cache(maxsize=None)
def eval_model():
  """(model, model_config, params): one layer per tower, so the evaluators' programs compile in seconds."""
  vocab = get_tokenizer("scenes_words", max_len=EVAL_MAX_LEN).vocab_size
  cfg = tiny_model_config(**{"text.vocab_size": vocab, "text.context_length": EVAL_MAX_LEN, "vision.depth": 1,
                             "text.depth": 1, "text_decoder.depth": 1})
  model = build_model(cfg)
  return model, cfg, random_params(model)


# ---------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------


def small_train_config(**overrides):
  """The smallest training config the trainer tests share: sycoca_tiny:runlocal (batch 16), 6 steps.

  Its tower has the paper's linear patch embedding and CLS token, not the convolutional stem of sycoca_tiny: what
  these tests check (checkpoints, resume, preemption, several processes) does not depend on the stem, and the
  linear one compiles the train step in about 30 % less time. The stems have their own tests (tests/test_model.py),
  and sycoca_tiny:runlocal itself trains in the ablation and notebook tests."""
  spec = importlib.util.spec_from_file_location("sycoca_tiny", os.path.join(ROOT, "configs", "sycoca_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.total_steps = 6
  config.log_steps = 1
  config.ckpt_steps = 2
  config.keep_ckpts = 10
  config.model.vision.update(stem="linear", pool="tok")
  for key, value in overrides.items():
    config_lib.set_by_path(config, key, value)
  return config


def trained_run_config(**overrides):
  """The config of the shared `trained_run` fixture (tests/conftest.py): small_train_config for 2 steps, with
  checkpoints at steps 1 and 2 written synchronously. Resuming its workdir with this config trains nothing more."""
  return small_train_config(**{"total_steps": 2, "ckpt_steps": 1, "async_checkpointing": False, **overrides})


def copy_run(workdir, destination):
  """A private copy of a run's workdir (e.g. the shared `trained_run`), for a test that changes or resumes it."""
  shutil.copytree(workdir, destination)
  return destination
