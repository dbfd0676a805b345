"""One process of the two-process evaluator test (tests/test_eval_multiprocess.py starts two of these).

  python -m tests.eval_worker PROCESS_ID NUM_PROCESSES PORT OUT_JSON
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import jax  # noqa: E402


def main():
  process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                             process_id=process_id)
  from tests.test_eval_multiprocess import run_all  # pylint: disable=g-import-not-at-top

  metrics = run_all()
  with open(out, "w") as f:
    json.dump({"metrics": metrics, "devices": jax.device_count(), "processes": jax.process_count()}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
