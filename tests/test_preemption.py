"""SIGTERM handling: the flag the hosts vote with, and a process that stays killable whatever the loop does.

The collective part (every host stopping at one step, on a signal to any one of them) runs for real in
tests/test_pod.py; here a process whose main thread is stuck, as in a collective that never returns, must still
end on a second SIGTERM, or by itself once the grace period is over.
"""

import os
import signal
import subprocess
import sys
import time

from sycoca_jax import preemption
from tests import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A run whose main thread never returns to the loop after SIGTERM (a hung collective).
_STUCK = """
import sys, time
sys.path.insert(0, {root!r})
from sycoca_jax import preemption
sync = preemption.PreemptionSync(grace_s={grace})
print("ready", flush=True)
while True:
  time.sleep(0.05)
  if sync.flag:
    print("flag", flush=True)
    while True:
      time.sleep(0.05)
"""


def _stuck(*graces):
  """One stuck process per grace period, started side by side, each ready for its SIGTERM."""
  procs = [subprocess.Popen([sys.executable, "-c", _STUCK.format(root=ROOT, grace=grace)],
                            env=distributed.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for grace in graces]
  for proc in procs:
    assert proc.stdout.readline().strip() == "ready"
  return procs


def test_a_second_sigterm_or_the_grace_period_ends_a_stuck_process():
  second, timed = _stuck(600, 1)
  try:
    for proc in (second, timed):
      proc.send_signal(signal.SIGTERM)
      assert proc.stdout.readline().strip() == "flag"  # the first one only asks the loop to stop
    time.sleep(0.5)
    assert second.poll() is None
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=10) == 128 + signal.SIGTERM
    assert "a second SIGTERM" in second.stderr.read()
    t = time.time()
    assert timed.wait(timeout=20) == 128 + signal.SIGTERM and time.time() - t < 10
    assert "no clean exit 1 s after SIGTERM" in timed.stderr.read()
  finally:
    for proc in (second, timed):
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_one_process_stops_at_the_signalled_step_and_close_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  sync = preemption.PreemptionSync()
  try:
    assert not sync.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # the handler runs between bytecodes of this thread
    assert sync.reached(2)
  finally:
    sync.close()
  assert signal.getsignal(signal.SIGTERM) == before
