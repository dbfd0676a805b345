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


def pytest_configure(config):
  # Subprocess tests that train for real; `-m "not slow"` keeps the inner loop short.
  config.addinivalue_line("markers", "slow: spawns training subprocesses (tens of seconds or more).")
