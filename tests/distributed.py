"""Running a test function on two processes over loopback (one CPU device each, gloo collectives).

  results = distributed.run_on_processes("tests.test_captioning:two_process_target", tmp_path, while_waiting=fn)

The target is called in each worker after jax.distributed.initialize and must return something JSON can write;
`while_waiting` runs in the test's own process meanwhile (the one-process reference), and its result is
returned beside the workers'.
"""

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What processes that run together over loopback get on top of the test session's environment: no persistent
# compilation cache. JAX writes cache entries from process 0 only and CPU processes key their programs apart, so
# process 0 would load its programs at once while process 1 compiles; on two loaded cores that gap can pass gloo's
# 30 s connection timeout.
SEVERAL_PROCESSES_ENV = {"JAX_ENABLE_COMPILATION_CACHE": "false"}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_on_processes(target: str, tmp_path, while_waiting=None, num_processes: int = 2, timeout: int = 400):
  """(while_waiting(), [each worker's result]) for `target` ('module:function') on `num_processes` processes."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **SEVERAL_PROCESSES_ENV)
  env.pop("XLA_FLAGS", None)
  outs = [os.path.join(str(tmp_path), f"process_{i}.json") for i in range(num_processes)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed", target, str(i), str(num_processes),
                             str(port), out], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i, out in enumerate(outs)]
  try:
    local = while_waiting() if while_waiting else None
    for p in procs:
      log = p.communicate(timeout=timeout)[0].decode()
      assert p.returncode == 0, log[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for out in outs:
    with open(out) as f:
      results.append(json.load(f))
  return local, results


def _worker():
  target, process_id, num_processes, port, out = sys.argv[1:6]
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=int(num_processes),
                             process_id=int(process_id))
  module, function = target.split(":")
  result = getattr(importlib.import_module(module), function)()
  with open(out, "w") as f:
    json.dump(dict(result, devices=jax.device_count(), processes=jax.process_count()), f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker()
