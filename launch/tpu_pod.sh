#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every host; the hosts start JAX's distributed runtime
# together (--distributed: JAX finds its peers from the TPU metadata).
#   TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh --config=configs/sycoca_base.py --workdir=gs://BUCKET/run
# Setup once per slice: launch/tpu_pod.sh --setup   (copies this checkout to every host and installs it).
#
# Each launch first stops what an earlier launch left running on the hosts (a TPU is used by one process at a
# time), then starts the run under nohup (it survives a dropped ssh session). Each host's log goes to
# WORKDIR/logs/<host>.log, copied every minute when the workdir is a bucket: a preempted VM takes its disk
# with it. Preemption sends SIGTERM, on which every host checkpoints the same step and exits 0; rerun the same
# command (on the recreated slice) to resume.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-sycoca_jax}
GCLOUD=${GCLOUD:-gcloud}
ssh_all() { "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }
if [[ "${1:-}" == "--setup" ]]; then
  "$GCLOUD" compute tpus tpu-vm scp --recurse "$(cd "$(dirname "$0")/.." && pwd)" "$TPU_NAME:$REPO_DIR" \
    --zone="$ZONE" --worker=all
  # jax[tpu] as setup.py's "tpu" extra pins it (the jax this code supports, and the libtpu matched to it);
  # an unpinned `pip install -U jax[tpu]` could install a jax the package then downgrades, leaving libtpu behind.
  ssh_all "cd $REPO_DIR && pip install -e '.[tpu]'"
  exit 0
fi

workdir=""
for ((i = 1; i <= $#; i++)); do
  case "${!i}" in
    --workdir=*) workdir="${!i#--workdir=}" ;;
    --workdir) j=$((i + 1)); workdir="${!j:-}" ;;
  esac
done
: "${workdir:?pass --workdir}"
args=$(printf '%q ' "$@")

read -r -d '' remote <<SCRIPT || true
cd $REPO_DIR
# An earlier launch's run, if still there: SIGTERM (it checkpoints), then SIGKILL after two minutes.
if [ -f ~/sycoca_train.pid ]; then
  old=\$(cat ~/sycoca_train.pid)
  kill -TERM "\$old" 2>/dev/null || true
  for _ in \$(seq 120); do kill -0 "\$old" 2>/dev/null || break; sleep 1; done
  kill -KILL "\$old" 2>/dev/null || true
  rm -f ~/sycoca_train.pid
fi
host=\$(hostname)
case "$workdir" in
  gs://*) log=\$HOME/sycoca_train_\$host.log ;;
  *) mkdir -p "$workdir/logs"; log="$workdir/logs/\$host.log" ;;
esac
nohup python main.py --distributed $args >> "\$log" 2>&1 < /dev/null &
pid=\$!
echo \$pid > ~/sycoca_train.pid
case "$workdir" in
  gs://*) nohup sh -c "while kill -0 \$pid 2>/dev/null; do sleep 60; gcloud storage cp -q \$log $workdir/logs/\$host.log; done; \
            gcloud storage cp -q \$log $workdir/logs/\$host.log" > /dev/null 2>&1 < /dev/null & ;;
esac
SCRIPT
ssh_all "$remote"
