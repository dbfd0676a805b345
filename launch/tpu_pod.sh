#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every host; JAX finds its peers by itself.
#   TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh --config=configs/sycoca_base.py --workdir=gs://BUCKET/run
# Setup once per slice: launch/tpu_pod.sh --setup   (copies this checkout to every host and installs it).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-sycoca_jax}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }
if [[ "${1:-}" == "--setup" ]]; then
  gcloud compute tpus tpu-vm scp --recurse "$(cd "$(dirname "$0")/.." && pwd)" "$TPU_NAME:$REPO_DIR" \
    --zone="$ZONE" --worker=all
  ssh_all "cd $REPO_DIR && pip install -U 'jax[tpu]' && pip install -e ."
  exit 0
fi
# nohup + a log per host: the run survives a dropped ssh session; preemption sends SIGTERM, which checkpoints.
ssh_all "cd $REPO_DIR && nohup python main.py $* > train_\$(hostname).log 2>&1 &"
