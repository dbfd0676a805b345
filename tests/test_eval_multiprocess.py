"""Two processes (one CPU device each, gloo collectives) give the same metrics as one process with 8 devices.

Padding with masks keeps both processes stepping together; an odd number of examples leaves a padded last
batch, and the process-local slices of every batch are reassembled in dataset order (one gather per
evaluation). The trainer's per-host counters are summed over both processes.
"""

import ml_collections
import numpy as np
import pytest

from tests import distributed

EVALS = {
    "retrieval": dict(type="retrieval", max_examples=11, batch_size=4),
    "zeroshot": dict(type="zeroshot", datasets=("sklearn_digits",), max_examples=13, batch_size=4, captioner=True),
    "probe": dict(type="probe", datasets=("lfw_subset",), methods=("ridge",), max_examples=30, batch_size=4),
}


def run_all() -> dict[str, float]:
  from sycoca_jax import evaluators  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top

  model, _, params = helpers.eval_model()
  evals = ml_collections.ConfigDict(EVALS)
  metrics = {}
  for _, evaluator, _ in evaluators.from_config(evals, model, helpers.eval_data_config()):
    metrics.update(evaluator.run(params))
  return metrics


def two_process_target() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from sycoca_jax import train  # pylint: disable=g-import-not-at-top

  # Each host's skip counters, with a reason only one of them saw: the trainer logs their sums.
  i = jax.process_index()
  skipped = train._sum_over_hosts({"skipped": i + 1, f"skipped/reason_{i}": i + 1})  # pylint: disable=protected-access
  return {"metrics": run_all(), "skipped": skipped}


@pytest.mark.slow(reason="two processes over loopback, each compiling every evaluator")
def test_two_processes_equal_one(tmp_path):
  # This process (8 devices) computes the reference while the two one-device workers run.
  single, workers = distributed.run_on_processes("tests.test_eval_multiprocess:two_process_target", tmp_path,
                                                 while_waiting=run_all)
  assert single["retrieval/num_images"] == 11 and "zeroshot/sklearn_digits_captioner_top1" in single
  assert all(np.isfinite(v) for v in single.values())
  for got in workers:
    assert got["devices"] == 2 and got["processes"] == 2
    assert got["skipped"] == {"skipped": 3, "skipped/reason_0": 1, "skipped/reason_1": 2}
    assert set(got["metrics"]) == set(single)
    for k, v in single.items():
      assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
