"""Running a test function on two processes over loopback (one CPU device each, gloo collectives).

  results = distributed.run_on_processes("tests.test_captioning:two_process_target", tmp_path, while_waiting=fn)

The target is called in each worker after jax.distributed.initialize and must return something JSON can write;
`while_waiting` runs in the test's own process meanwhile (the one-process reference), and its result is
returned beside the workers'.
"""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int = 1) -> str:
  """The suite's XLA flags (tests/conftest.py) for a process of `devices` fake CPU devices."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT)]
  return " ".join(flags + [f"{_DEVICE_COUNT}={devices}"])


def child_env(devices: int = 1, **variables: str) -> dict[str, str]:
  """The environment of a process a test starts: the test's own, with `devices` fake CPU devices."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), **variables)


def spawn_train_worker(**spec) -> subprocess.Popen:
  """tests/train_worker.py on `spec` (see its docstring) in a new process; its output, as text, on stdout."""
  return subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "train_worker.py"), json.dumps(spec)],
                          cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def drain(proc: subprocess.Popen, timeout: float) -> concurrent.futures.Future:
  """Reads `proc`'s output while it runs; the future's result is all of it, once the process has exited.

  A process that logs into a pipe nobody reads stops at its first write past the pipe's 64 KiB, and waits there
  until someone reads: a training run left to run beside something else would stall (its peers too, in their next
  collective) until the test got round to reading it.
  """
  pool = concurrent.futures.ThreadPoolExecutor(1)
  future = pool.submit(lambda: proc.communicate(timeout=timeout)[0])
  pool.shutdown(wait=False)
  return future


def communicate(procs: list[subprocess.Popen], timeout: float) -> list[str]:
  """The output of each of `procs`, read from all of them at once (see `drain`), once they have all exited."""
  return [future.result() for future in [drain(p, timeout) for p in procs]]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def initialize(process_id: int, num_processes: int, port: int) -> None:
  """jax.distributed over loopback with gloo collectives, the processes sharing one persistent compilation cache.

  JAX keys a cache entry with the topology's fingerprint, which on CPU covers the calling process's devices only,
  so the processes of one run key the same program apart, and only process 0 writes entries: process 0 would load
  a program at once while process 1 compiles it, and on two loaded cores that gap can pass gloo's 30 s connection
  timeout. Keyed on the program's devices instead (platform, kind and global id: the same on every process), every
  process finds what process 0 wrote; and on a miss process 0 compiles once and hands the executable to the others
  (jax_share_binary_between_hosts), rather than each process compiling it on the same cores. Where this jax has no
  such hook, the cache is switched off for the run instead.
  """
  import jax  # pylint: disable=g-import-not-at-top

  try:
    from jax._src import cache_key  # pylint: disable=g-import-not-at-top
    shareable = callable(getattr(cache_key, "_hash_accelerator_config", None))
  except ImportError:
    shareable = False
  if shareable:
    def hash_devices(hash_obj, devices):
      for d in devices.flat:
        hash_obj.update(f"{d.platform}:{d.device_kind}:{d.id};".encode())
    cache_key._hash_accelerator_config = hash_devices  # pylint: disable=protected-access
    jax.config.update("jax_share_binary_between_hosts", True)
    # A process that waits for an executable longer than this has lost its peer: fail rather than hang.
    jax.config.update("jax_share_binary_between_hosts_timeout_ms", 300_000)
  else:
    jax.config.update("jax_enable_compilation_cache", False)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                             process_id=process_id)


def run_on_processes(target: str, tmp_path, while_waiting=None, num_processes: int = 2, timeout: int = 400):
  """(while_waiting(), [each worker's result]) for `target` ('module:function') on `num_processes` processes."""
  port = free_port()
  env = child_env(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
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
  os.environ["XLA_FLAGS"] = xla_flags(1)
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  initialize(int(process_id), int(num_processes), int(port))
  module, function = target.split(":")
  result = getattr(importlib.import_module(module), function)()
  with open(out, "w") as f:
    json.dump(dict(result, devices=jax.device_count(), processes=jax.process_count()), f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker()
