"""Two processes (one CPU device each, gloo collectives) give the same metrics as one process with 8 devices.

Padding with masks keeps both processes stepping together; an odd number of examples leaves a padded last
batch, and the process-local slices of every batch are reassembled in dataset order.
"""

import json
import os
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EVALS = {
    "retrieval": dict(type="retrieval", max_examples=11, batch_size=4),
    "zeroshot": dict(type="zeroshot", datasets=("sklearn_digits",), max_examples=13, batch_size=4),
    "probe": dict(type="probe", datasets=("lfw_subset",), methods=("ridge",), max_examples=30, batch_size=4),
}


def run_all() -> dict[str, float]:
  from sycoca_jax.evaluators import get_evaluator  # pylint: disable=g-import-not-at-top
  from tests import eval_setup  # pylint: disable=g-import-not-at-top

  model, cfg, params = eval_setup.tiny_model()
  metrics = {}
  for name, ev in EVALS.items():
    evaluator = get_evaluator(name)(model, cfg, ml_collections.ConfigDict(ev), eval_setup.data_config())
    metrics.update(evaluator.run(params))
  return metrics


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  outs = [tmp_path / f"p{i}.json" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.eval_worker", str(i), "2", str(port), str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i, out in enumerate(outs)]
  try:
    single = run_all()  # this process: 8 devices, while the two workers run
    for p in procs:
      log = p.communicate(timeout=400)[0].decode()
      assert p.returncode == 0, log[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert single["retrieval/num_images"] == 11
  assert all(np.isfinite(v) for v in single.values())
  for out in outs:
    got = json.loads(out.read_text())
    assert got["devices"] == 2 and got["processes"] == 2
    assert set(got["metrics"]) == set(single)
    for k, v in single.items():
      assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
