"""The workdir lock: a second run on a workdir in use stops at once naming the holder; a dead holder's lock is
taken over; the lock goes with the run."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sycoca_jax import paths, train
from tests.helpers import small_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Another process holding the lock, as a run in progress does, until it is killed.
_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from sycoca_jax import paths
paths.WorkdirLock({workdir!r}).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _hold(workdir):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=ROOT, workdir=str(workdir))],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_second_run_on_a_locked_workdir_stops_at_once_naming_the_holder(tmp_path):
  workdir = tmp_path / "w"
  holder = _hold(workdir)
  try:
    t = time.time()
    with pytest.raises(paths.WorkdirLocked, match=f"in use by process {holder.pid} on host {socket.gethostname()}"):
      train.train_and_evaluate(small_train_config(), str(workdir))
    assert time.time() - t < 20  # before anything compiled
    assert sorted(os.listdir(workdir)) == ["LOCK"]  # and nothing written
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_lock_of_a_dead_process_is_taken_over_and_released(tmp_path, caplog):
  workdir = tmp_path / "w"
  holder = _hold(workdir)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  lock = paths.WorkdirLock(workdir).acquire()
  assert f"left by process {holder.pid}" in caplog.text and "taking it over" in caplog.text
  assert lock.holder() == {"host": socket.gethostname(), "pid": os.getpid()}
  lock.release()
  assert not (workdir / "LOCK").exists()


@pytest.mark.slow(reason="trains a tiny run")
def test_training_run_releases_the_lock(tmp_path):
  workdir = tmp_path / "w"
  train.train_and_evaluate(small_train_config(total_steps=1, async_checkpointing=False), str(workdir))
  assert not (workdir / "LOCK").exists()
