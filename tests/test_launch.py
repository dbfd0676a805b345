"""launch/tpu_pod.sh against a fake gcloud that runs each host's command here: what a pod launch does on a host."""

import os
import signal
import socket
import stat
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# gcloud ... ssh --command=CMD runs CMD here, as a host would; python and pip only record how they were called.
_GCLOUD = """#!/usr/bin/env bash
for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}";; esac; done
"""
_RECORD = """#!/usr/bin/env bash
echo "$0 $*" >> "$HOME/calls"
echo "step 1 of a run"
"""


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_tpu_pod_launch_starts_the_distributed_runtime_stops_stale_runs_and_logs_into_the_workdir(tmp_path):
  home, repo, bin_dir, workdir = (tmp_path / n for n in ("home", "repo", "bin", "run"))
  for d in (home, repo, bin_dir):
    d.mkdir()
  _executable(bin_dir / "gcloud", _GCLOUD)
  _executable(bin_dir / "python", _RECORD)
  _executable(bin_dir / "pip", _RECORD)
  env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="pod", ZONE="z",
             REPO_DIR=str(repo), GCLOUD=str(bin_dir / "gcloud"))
  script = os.path.join(ROOT, "launch", "tpu_pod.sh")

  subprocess.run([script, "--setup"], env=env, check=True, timeout=60)
  assert f"{bin_dir}/pip install -e .[tpu]" in (home / "calls").read_text()  # setup.py's pin, no bare -U

  stale = subprocess.Popen(["sleep", "600"])  # an earlier launch's run, still holding the TPU
  reaper = threading.Thread(target=stale.wait)  # reaped as soon as it ends, as its own parent would
  reaper.start()
  (home / "sycoca_train.pid").write_text(str(stale.pid))
  try:
    subprocess.run([script, "--config=configs/sycoca_tiny.py", f"--workdir={workdir}"], env=env, check=True,
                   timeout=60)
    reaper.join(timeout=10)
    assert stale.returncode == -signal.SIGTERM  # asked to checkpoint and stop first
  finally:
    if stale.poll() is None:
      stale.kill()
  log = workdir / "logs" / f"{socket.gethostname()}.log"
  t = time.time()
  while not (log.exists() and "step 1" in log.read_text()) and time.time() - t < 10:
    time.sleep(0.1)
  assert "step 1 of a run" in log.read_text()
  call = (home / "calls").read_text().splitlines()[-1]
  assert call == f"{bin_dir}/python main.py --distributed --config=configs/sycoca_tiny.py --workdir={workdir}"
  assert int((home / "sycoca_train.pid").read_text()) != stale.pid
