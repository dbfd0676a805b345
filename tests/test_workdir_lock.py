"""The workdir lock, a lease: a second run on a workdir in use stops at once naming the holder; a dead holder's
lock, a stale lease (a requeue onto new hosts) and the same scheduler job's lock are taken over; the lock goes
with the run."""

import json
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
  assert f"held by process {holder.pid} on {socket.gethostname()}, which is gone: taking it over" in caplog.text
  assert {k: lock.holder()[k] for k in ("host", "pid")} == {"host": socket.gethostname(), "pid": os.getpid()}
  lock.release()
  assert not (workdir / "LOCK").exists()


@pytest.mark.slow(reason="trains a tiny run")
def test_training_run_releases_the_lock(tmp_path):
  workdir = tmp_path / "w"
  train.train_and_evaluate(small_train_config(total_steps=1, async_checkpointing=False), str(workdir))
  assert not (workdir / "LOCK").exists()


def _plant(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  (workdir / "LOCK").write_text(json.dumps(holder))


def test_a_lease_from_another_host_is_refused_while_fresh_and_taken_over_once_stale(tmp_path, caplog):
  """A requeued job on new hosts starts (its predecessor's heartbeat stopped); a live run elsewhere is refused."""
  workdir = tmp_path / "w"
  _plant(workdir, host="other-host", pid=123, job=None, heartbeat=time.time() - 5)
  with pytest.raises(paths.WorkdirLocked, match=r"in use by process 123 on host other-host .*heartbeat 5 s ago"):
    paths.WorkdirLock(workdir, lease_s=60).acquire()
  _plant(workdir, host="other-host", pid=123, job=None, heartbeat=time.time() - 61)
  lock = paths.WorkdirLock(workdir, lease_s=60).acquire()
  assert "held by process 123 on other-host, whose heartbeat is 61 s old (lease 60 s)" in caplog.text
  assert lock.holder()["host"] == socket.gethostname()
  lock.release()


def test_the_same_scheduler_job_takes_its_lock_over_and_the_heartbeat_renews_it(tmp_path, monkeypatch, caplog):
  workdir = tmp_path / "w"
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  _plant(workdir, host="node-07", pid=99, job="4242", heartbeat=time.time())
  lock = paths.WorkdirLock(workdir, lease_s=0.4).acquire()
  assert "of this job (4242), requeued" in caplog.text
  first = lock.holder()["heartbeat"]
  time.sleep(0.5)
  assert lock.holder()["heartbeat"] > first  # renewed every lease_s / 4
  lock.release()
  assert not (workdir / "LOCK").exists()
