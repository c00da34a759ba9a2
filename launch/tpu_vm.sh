#!/usr/bin/env bash
# Train on a Cloud TPU VM: a single host (v5e-8, the default) or a pod slice
# (ACCELERATOR_TYPE=v4-32 RUNTIME_VERSION=tpu-ubuntu2204-base ZONE=us-central2-b).
#
#   launch/tpu_vm.sh create     # create the VM (all workers of a slice)
#   launch/tpu_vm.sh install    # clone + pip install on every worker
#   launch/tpu_vm.sh train      # python -m xmedjax.main on all workers at once (in tmux)
#   launch/tpu_vm.sh watch      # follow worker 0's log
#   launch/tpu_vm.sh fetch      # copy the run's reports from the bucket to ./runs/
#   launch/tpu_vm.sh delete     # delete the VM (stops the billing)
#
# Data and checkpoints live on gs://: prepare the dataset once anywhere with
#   python -m data_prep.build --dataset=brain_tumor_mri --src=DIR --out=prepared/brain
#   gsutil -m cp -r prepared/brain "$BUCKET/data/brain"
# Every path in the config is a plain string; gs:// paths go through TFDS, Grain and Orbax.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

DATA_DIR="${DATA_DIR:-$BUCKET/data/brain}"
WORKDIR="${WORKDIR:-$BUCKET/runs/$RUN_NAME}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    ;;
  install)
    tpu_ssh "set -e; rm -rf xmedjax; git clone --depth 1 --branch $REPO_REF $REPO_URL xmedjax \
      && cd xmedjax && pip install -U pip && pip install -e . 'jax[tpu]' \
      && python -c 'import jax; print(jax.process_index(), jax.device_count())'"
    ;;
  train)
    # One process per host; jax.distributed.initialize() finds the others on TPU VMs.
    tpu_ssh "cd xmedjax && tmux new-session -d -s xmedjax \
      'python -m xmedjax.main --config=$CONFIG --workdir=$WORKDIR \
       --config.data.data_dir=$DATA_DIR --config.runtime.distributed=on $EXTRA_FLAGS 2>&1 | tee -a train.log'"
    echo "started $RUN_NAME on $TPU_NAME; outputs in $WORKDIR"
    ;;
  watch)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
      --worker=0 --command="tail -n 50 -f xmedjax/train.log"
    ;;
  fetch)
    mkdir -p "runs/$RUN_NAME"
    gsutil -m cp -r "$WORKDIR/metrics.json" "$WORKDIR/report.html" "$WORKDIR/heatmaps" "runs/$RUN_NAME/"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
    ;;
  *)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
