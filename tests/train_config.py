"""The smallest training config the trainer tests share: sycoca_tiny:runlocal, batch 16."""

import importlib.util
import os

from sycoca_jax import config_lib

_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sycoca_tiny.py")


def small_train_config(**overrides):
  spec = importlib.util.spec_from_file_location("sycoca_tiny", _TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.total_steps = 6
  config.log_steps = 1
  config.ckpt_steps = 2
  config.keep_ckpts = 10
  for key, value in overrides.items():
    config_lib.set_by_path(config, key, value)
  return config
