#!/usr/bin/env bash
# Shared settings for the TPU launch scripts. Override any of them in the environment.
# Sourced, not run.

# shellcheck disable=SC2034  # variables are used by the scripts that source this file
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ZONE:=us-central2-b}"              # v4 lives here; v5e: us-west4-a or europe-west4-b
: "${TPU_NAME:=xmedjax-tpu}"
: "${ACCELERATOR_TYPE:=v5litepod-8}"    # single host v5e-8; a pod slice: v4-32
: "${RUNTIME_VERSION:=v2-alpha-tpuv5-lite}"  # v4: tpu-ubuntu2204-base
: "${REPO_URL:=https://github.com/YOUR_ORG/xmedjax.git}"
: "${REPO_REF:=main}"
: "${BUCKET:=gs://YOUR_BUCKET/xmedjax}"  # prepared datasets, converted weights, run dirs
: "${CONFIG:=configs/brain_densenet.py}"
: "${RUN_NAME:=brain_densenet_$(date +%Y%m%d_%H%M%S)}"

tpu_ssh() {
  # Runs a command on every worker of the TPU VM (all hosts of a pod slice at once).
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker=all --command="$1"
}
