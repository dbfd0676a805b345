"""Test setup: eight fake CPU devices so sharding code paths run for real."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import importlib.util  # noqa: E402

# With torch installed, open_clip -> torchvision -> torch._dynamo imports triton. triton's extension segfaults
# when it is loaded after TensorFlow (which clu and tfds import), so load it first whenever it is present.
if importlib.util.find_spec("triton") is not None:
  import triton  # noqa: E402,F401  pylint: disable=unused-import

import pytest  # noqa: E402

from sycoca_jax import config_lib  # noqa: E402
from sycoca_jax.models.sycoca import default_model_config  # noqa: E402


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


@pytest.fixture
def tiny_config():
  return tiny_model_config


def pytest_configure(config):
  # Subprocess tests that train for real; `-m "not slow"` keeps the inner loop short.
  config.addinivalue_line("markers", "slow: spawns training subprocesses (tens of seconds or more).")
