#!/usr/bin/env bash
# Run one distillation recipe on every host of a TPU pod slice (same command on each host).
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a ./tpu_scripts/distill_pod.sh configs/eva02_clip_e_prune1.py gs://bucket/run
# DGMR_TPU_POD=1 makes dgmr-jax call jax.distributed.initialize() with the pod's own discovery;
# each host then reads its slice of the data and the same workdir resumes after preemption.
set -euo pipefail
config=${1:?recipe file}
workdir=${2:?workdir (gs:// or a shared filesystem)}
shift 2
gcloud compute tpus tpu-vm ssh "${TPU_NAME:?}" --zone "${ZONE:?}" --worker=all --command "
  cd ~/dgmr-jax && pip install -q -c constraints.txt -e . 'jax[tpu]' &&
  DGMR_TPU_POD=1 dgmr-jax distill --config $config --workdir $workdir $*"
