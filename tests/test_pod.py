"""A pod run rehearsed on one machine: two processes of two CPU devices each, over loopback.

One workdir goes through what a pod's first days bring, in as few launches as the scenarios allow:
  1. a run with image logs, every evaluator and checkpoints at a short cadence; SIGTERM to process 1 only:
     both processes stop at one step, checkpoint it (with both input-pipeline states) and exit 0;
  2. the restart, requeued onto "another host" while the vanished first host's lock is still there (stale):
     it takes the lock over, and is stopped by SIGTERM to both;
  3. with one process's input-pipeline state of the newest checkpoint damaged, the last restart falls back to
     the checkpoint before it (on both processes) and ends with the parameters of an uninterrupted run;
  4. resuming that two-process workdir with one process is refused with one line.
Meanwhile one process of four devices trains the same steps uninterrupted (the reference), then restarts from
an earlier checkpoint and loads its train step from the persistent compilation cache.
"""

import json
import os
import shutil
import signal
import sys
import time

import jax
import numpy as np
import pytest

from sycoca_jax import checkpoint, metrics
from tests import distributed

# One evaluator (it gathers from both processes, as each does): every one of them would add half a minute of
# compiling on two cores to each launch; tests/test_eval_multiprocess.py runs the others on two processes.
_EVALS = ("retrieval",)


def _overrides():
  o = {"total_steps": 16, "ckpt_steps": 2, "log_steps": 1, "image_log_steps": 2}
  o.update({f"evals.{name}.log_steps": 0 for name in ("zeroshot", "captioning", "masking")})
  for name in _EVALS:
    o.update({f"evals.{name}.log_steps": 4, f"evals.{name}.max_examples": 8, f"evals.{name}.batch_size": 8})
  return o


def _pod(workdir, overrides, **spec):
  port = distributed.free_port()
  return [distributed.spawn_train_worker(workdir=str(workdir), devices=2, num_processes=2, process_id=i, port=port,
                                         overrides=overrides, **spec) for i in range(2)]


def _finish(procs, timeout):
  outs = distributed.communicate(procs, timeout)
  print(f"{time.strftime('%X')} pod exited", flush=True, file=sys.stderr)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _logged_step(workdir):
  try:
    return max([r["step"] for r in metrics.read_jsonl(workdir) if "loss" in r] or [0])
  except (FileNotFoundError, ValueError):  # not written yet, or a row being written
    return 0


def _wait_for_step(workdir, step, procs, timeout=400):
  t = time.time()
  while _logged_step(workdir) < step:
    for p in procs:
      if p.poll() is not None:
        raise AssertionError(f"worker exited early: {p.stdout.read()[-4000:]}")
    if time.time() - t > timeout:  # a guard, not a check: an assert here would count once per poll
      raise AssertionError("no progress")
    time.sleep(0.1)


def _terminate(procs, which):
  """SIGTERM to `which` processes; returns the seconds until every process of the pod has exited."""
  t = time.time()
  for i in which:
    procs[i].send_signal(signal.SIGTERM)
  outs = _finish(procs, timeout=120)
  return time.time() - t, outs


def _checkpoint_with_every_state(workdir):
  step = checkpoint.Checkpointer(str(workdir)).latest_step()
  assert sorted(os.listdir(workdir / "data_state" / str(step))) == ["process_0.json", "process_1.json"]
  return step


def _compile_seconds(out):
  line = next(l for l in out.splitlines() if "Train step compiled in" in l)
  return float(line.split("compiled in ")[1].split(" s")[0]), line


@pytest.mark.slow(reason="four launches of two training processes, and a one-process reference run")
def test_pod_rehearsal_preemption_requeue_cache_and_damaged_state(tmp_path):
  workdir = tmp_path / "pod"
  overrides = _overrides()
  # The pod's processes share the session's compilation cache (tests/distributed.initialize): the first launch
  # compiles each program once, on process 0, and the restarts load them.
  cached = {"env": {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}}  # the tiny model's programs too
  straight = dict(overrides, image_log_steps=0, compilation_cache_dir=str(tmp_path / "straight" / "cache"),
                  **{f"evals.{name}.log_steps": 0 for name in _EVALS})
  reference = distributed.spawn_train_worker(workdir=str(tmp_path / "straight"), devices=4, overrides=straight,
                                             **cached)
  reference_out = distributed.drain(reference, timeout=600)  # it runs beside the pod's launches, to its end

  # 1. SIGTERM to one host only.
  procs = _pod(workdir, overrides, batch_delay=0.5)
  _wait_for_step(workdir, 5, procs)  # past the first evaluation (step 4): every program compiled
  seconds, outs = _terminate(procs, [1])
  assert seconds < 60 and all("PREEMPTED" in out for out in outs), (seconds, outs[0][-3000:])
  first_stop = _checkpoint_with_every_state(workdir)
  assert 5 <= first_stop < 16 and _logged_step(workdir) == first_stop
  rows = metrics.read_jsonl(workdir)
  for name in _EVALS:  # every evaluator ran (on both processes: they gather from each other)
    assert any(k.startswith(f"{name}/") for r in rows for k in r), name

  # 2. Requeued onto another host, the first one's lock left behind, stale; SIGTERM to both at once.
  (workdir / "LOCK").write_text(json.dumps({"host": "vanished-host", "pid": 1, "job": None,
                                            "heartbeat": time.time() - 3600}))
  procs = _pod(workdir, overrides, batch_delay=0.5, hostname="requeued-host")
  _wait_for_step(workdir, first_stop + 2, procs)
  seconds, outs = _terminate(procs, [0, 1])
  assert seconds < 60 and all("PREEMPTED" in out for out in outs), (seconds, outs[0][-3000:])
  assert "was held by process 1 on vanished-host, whose heartbeat is" in outs[0]
  second_stop = _checkpoint_with_every_state(workdir)
  assert first_stop + 2 <= second_stop < 16

  # 3. One process's input-pipeline state of the newest checkpoint damaged: both fall back to the one before.
  (workdir / "data_state" / str(second_stop) / "process_1.json").write_text('{"process_count": 2, "sta')
  outs = _finish(_pod(workdir, overrides), timeout=400)
  assert f"instead of step {second_stop}" in outs[0] and "input-pipeline state" in outs[0], outs[0][-3000:]
  assert os.path.isdir(workdir / "damaged_checkpoints" / str(second_stop))
  steps = [r["step"] for r in metrics.read_jsonl(workdir) if "loss" in r]
  assert steps == list(range(1, 17))  # each step logged once
  out = reference_out.result()
  assert reference.returncode == 0, out[-3000:]
  compiled_first, _ = _compile_seconds(out)
  want, got = (checkpoint.load_params(str(w), 16)[1] for w in (tmp_path / "straight", workdir))
  # The two runs split the batch differently (two processes against one), so their sums run in another order:
  # after 16 Adam steps the weights differ by rounding, up to ~1.3e-6 here (the attention key biases, whose gradient
  # is rounding noise alone: a bias on every key moves all of a query's logits alike). A step lost or taken twice
  # moves every weight by about the learning rate, 1e-3.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), want, got)

  # The reference, restarted from step 14, loads its train step from the persistent compilation cache.
  for folder in ("checkpoints", "data_state"):
    shutil.rmtree(tmp_path / "straight" / folder / "16")
  restart = distributed.spawn_train_worker(workdir=str(tmp_path / "straight"), devices=4, overrides=straight, **cached)
  out = _finish([restart], 400)[0]
  compiled_again, line = _compile_seconds(out)
  assert "programs loaded from the compilation cache" in line and compiled_again < compiled_first, line

  # 4. The same workdir on one process: refused, naming both counts, before anything is compiled.
  one = distributed.spawn_train_worker(workdir=str(workdir), devices=2, overrides=overrides)
  out, _ = one.communicate(timeout=120)
  assert one.returncode != 0 and "was written by 2 processes, and this run has 1" in out, out[-3000:]
