#!/usr/bin/env bash
# Multi-node GPU run: start this on every node with its NODE_RANK (0..NUM_NODES-1).
#   COORDINATOR=node0:1234 NUM_NODES=4 NODE_RANK=0 ./tpu_scripts/distill_gpu_cluster.sh configs/openclip_vit_g14_prune1.py /shared/run
set -euo pipefail
config=${1:?recipe file}
workdir=${2:?shared workdir}
shift 2
DGMR_COORDINATOR=${COORDINATOR:?} DGMR_NUM_PROCESSES=${NUM_NODES:?} DGMR_PROCESS_ID=${NODE_RANK:?} \
  dgmr-jax distill --config "$config" --workdir "$workdir" "$@"
