#!/usr/bin/env bash
# Train on the GPUs of this machine: one process drives all local GPUs (data parallel
# over a jax.sharding.Mesh), or, with NUM_PROCESSES>1, one process per GPU on localhost.
#
#   launch/gpu.sh configs/brain_densenet.py runs/brain_densenet [--config.key=value ...]
#   NUM_PROCESSES=2 launch/gpu.sh configs/chest_resnet.py runs/chest_resnet
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,7p' "$0"
  exit 2
fi
config="$1"; workdir="$2"; shift 2
num_processes="${NUM_PROCESSES:-1}"
port="${COORDINATOR_PORT:-12355}"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true

if [[ "$num_processes" -le 1 ]]; then
  exec python -m xmedjax.main --config="$config" --workdir="$workdir" "$@"
fi

pids=()
for ((i = 0; i < num_processes; i++)); do
  CUDA_VISIBLE_DEVICES="$i" \
  XMEDJAX_COORDINATOR_ADDRESS="127.0.0.1:$port" XMEDJAX_NUM_PROCESSES="$num_processes" XMEDJAX_PROCESS_ID="$i" \
    python -m xmedjax.main --config="$config" --workdir="$workdir" --config.runtime.distributed=on "$@" \
    > "gpu_worker_$i.log" 2>&1 &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 20 gpu_worker_0.log
exit "$status"
