#!/usr/bin/env bash
# N processes on this machine, each with D CPU devices, talking over loopback: the multi-host code paths
# (per-process input slices, global arrays, checkpoints, process-0-only logging) without a cluster.
#   launch/local_multiprocess.sh 2 2 --config=configs/sycoca_tiny.py:runlocal --workdir=/tmp/sycoca_mp
set -euo pipefail
NUM_PROCESSES=${1:?number of processes}; DEVICES=${2:?CPU devices per process}; shift 2
PORT=${PORT:-$((20000 + RANDOM % 20000))}
cd "$(dirname "$0")/.."
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES}" \
    python main.py --coordinator_address="localhost:${PORT}" --num_processes="${NUM_PROCESSES}" \
    --process_id="${i}" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
