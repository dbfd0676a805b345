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
  # Tests that train for real (in subprocesses, on several processes, or for many steps); `-m "not slow"` leaves
  # them out and keeps the inner loop near a minute.
  config.addinivalue_line("markers", "slow: trains for real (subprocesses, several processes, many steps).")
