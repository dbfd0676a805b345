"""Runs a short training job in its own process, for tests that need fresh devices, several processes or a kill.

  python tests/train_worker.py '{"workdir": ..., "devices": 2, "process_id": 0, "num_processes": 2,
                                 "port": 12345, "overrides": {"total_steps": 6}, "batch_delay": 0.2,
                                 "nan_from_step": 0, "hostname": "other-host", "env": {"NAME": "value"}}'

"hostname" makes the run see another host name (a job requeued onto a new machine); "env" sets variables
before jax is imported. The log is at INFO, so a test can read what the run reports (e.g. its compile time).

Everything runs under `if __name__ == "__main__"`: input worker processes (data.num_workers > 0) are started
with multiprocessing's spawn, which imports this file again in each of them.
"""

import json
import os
import sys
import time

import numpy as np


class _Wrapped:
  """The real iterator, optionally slowed down (so a test can interrupt mid-run) or poisoned with NaNs."""

  def __init__(self, it, spec):
    self.it, self.spec, self.count = it, spec, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    self.count += 1
    time.sleep(self.spec.get("batch_delay", 0.0))
    if self.spec.get("nan_from_step") and self.count >= self.spec["nan_from_step"]:
      batch = dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))  # uint8 cannot be NaN
    return batch

  def __getattr__(self, name):
    return getattr(self.it, name)


def main(spec):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests import distributed  # pylint: disable=g-import-not-at-top  (no jax: the variables come first)

  os.environ["XLA_FLAGS"] = distributed.xla_flags(spec.get("devices", 1))
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.update(spec.get("env", {}))
  if spec.get("hostname"):
    import socket  # pylint: disable=g-import-not-at-top
    socket.gethostname = lambda: spec["hostname"]

  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)
  if spec.get("num_processes", 1) > 1:
    distributed.initialize(spec["process_id"], spec["num_processes"], spec["port"])

  from sycoca_jax import train  # pylint: disable=g-import-not-at-top
  from tests.helpers import small_train_config  # pylint: disable=g-import-not-at-top

  config = small_train_config(**spec.get("overrides", {}))
  build = train.build_train_iterator
  train.build_train_iterator = lambda *a, **k: _Wrapped(build(*a, **k), spec)
  try:
    train.train_and_evaluate(config, spec["workdir"])
  except train.Preempted as e:
    print("PREEMPTED", e, flush=True)
  except train.TooManyBadSteps as e:
    print("TOO_MANY_BAD_STEPS", e, flush=True)
    sys.exit(3)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
