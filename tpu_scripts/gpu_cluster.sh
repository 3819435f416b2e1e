#!/usr/bin/env bash
#SBATCH --job-name=dgmr-distill
#SBATCH --ntasks-per-node=1
#SBATCH --output=dgmr-distill-%j.log
# Multi-node GPU distillation under SLURM, or by hand on any cluster (docs/pod.md). From the repo root:
#   tpu_scripts/gpu_cluster.sh submit --nodes 4 --gpus-per-node 8 configs/openclip_vit_g14_prune1.py /shared/runs/g14
#   sbatch --nodes 4 --gpus-per-node 8 tpu_scripts/gpu_cluster.sh run configs/openclip_vit_g14_prune1.py /shared/runs/g14
# One process per node drives all of the node's GPUs. jax.distributed.initialize() reads its coordinator
# (first node of the job), process count (SLURM_NTASKS) and process id (SLURM_PROCID) from DGMR_COORDINATOR,
# DGMR_NUM_PROCESSES and DGMR_PROCESS_ID, which this script sets from the scheduler's environment.
# The workdir must be shared by all nodes (a shared filesystem or gs://); the same command resumes.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu_scripts/gpu_cluster.sh COMMAND [options] CONFIG WORKDIR [OVERRIDES...]

commands:
  submit  sbatch this script with `run` (from the repo root)
            --nodes N (default 2)  --gpus-per-node G (default 8)  --time T  --partition P  --account A
  run     inside the allocation (what sbatch runs): export DGMR_COORDINATOR (first node of
          `scontrol show hostnames $SLURM_JOB_NODELIST`, port COORDINATOR_PORT, default 20000 + job id
          % 10000) and DGMR_NUM_PROCESSES (SLURM_NTASKS), then srun distill, DGMR_PROCESS_ID=SLURM_PROCID
  env     print the DGMR_* values of this SLURM task (no CONFIG/WORKDIR)
  node    without a scheduler, on every node: COORDINATOR=host:port NUM_NODES=N NODE_RANK=i
options:
  --dry-run   print the commands ("+ " then the command) and run none
  -h, --help  this text
OVERRIDES go to `dgmr-jax distill` (--config.a.b=value ...).
EOF
}

die() {
  echo "gpu_cluster.sh: $*" >&2
  exit 2
}

q() { # shell-quote one word so that printed command lines can be pasted back into a shell
  local s=$1 plain='^[-A-Za-z0-9_@%+=:,./]+$'
  if [[ $s =~ $plain ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

qargs() {
  local a out=""
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

run() { # print the command; run it unless --dry-run
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(qargs "$@")"
  else
    printf '+ %s\n' "$(qargs "$@")" >&2
    "$@"
  fi
}

DRY_RUN=${DRY_RUN:-0}
NODES=2
GPUS_PER_NODE=8
sbatch_opts=()
cmd=""
while (($#)); do # options, the command, more options; then CONFIG WORKDIR and the overrides verbatim
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --nodes) NODES=${2:?--nodes needs a value}; shift ;;
    --gpus-per-node) GPUS_PER_NODE=${2:?--gpus-per-node needs a value}; shift ;;
    --time | --partition | --account) sbatch_opts+=("$1=${2:?$1 needs a value}"); shift ;;
    -*) die "unknown option $1 before CONFIG (see -h)" ;;
    *)
      [[ -z $cmd ]] || break
      cmd=$1
      ;;
  esac
  shift
done
[[ -n $cmd ]] || { usage >&2; exit 2; }

# DGMR_COORDINATOR and DGMR_NUM_PROCESSES from the SLURM allocation (the same in every task).
slurm_env() {
  [[ -n ${SLURM_JOB_NODELIST:-} ]] || die "not inside a SLURM allocation (no SLURM_JOB_NODELIST): use \
'submit', sbatch or salloc; or 'node' without a scheduler"
  local hosts
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  [[ -n $hosts ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed nothing"
  SLURM_COORD="${hosts%%$'\n'*}:${COORDINATOR_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}"
  NUM_PROCESSES=${SLURM_NTASKS:-${SLURM_JOB_NUM_NODES:-}}
  [[ -n $NUM_PROCESSES ]] || die "neither SLURM_NTASKS nor SLURM_JOB_NUM_NODES is set"
}

positional() {
  (($# >= 2)) || die "$cmd needs CONFIG WORKDIR (see -h)"
}

case $cmd in
  submit)
    positional "$@"
    script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
    run sbatch "--nodes=$NODES" "--gpus-per-node=$GPUS_PER_NODE" ${sbatch_opts[@]+"${sbatch_opts[@]}"} \
      "$script" run "$@"
    ;;
  run)
    positional "$@"
    slurm_env
    config=$1 workdir=$2
    shift 2
    if [[ $DRY_RUN == 1 ]]; then
      printf '+ export %s %s\n' "$(q "DGMR_COORDINATOR=$SLURM_COORD")" "$(q "DGMR_NUM_PROCESSES=$NUM_PROCESSES")"
    else
      export DGMR_COORDINATOR=$SLURM_COORD DGMR_NUM_PROCESSES=$NUM_PROCESSES
      echo "gpu_cluster.sh: DGMR_COORDINATOR=$SLURM_COORD DGMR_NUM_PROCESSES=$NUM_PROCESSES" >&2
    fi
    # each task sets its own DGMR_PROCESS_ID from the SLURM_PROCID srun gives it
    # shellcheck disable=SC2016
    run srun "--ntasks=$NUM_PROCESSES" --kill-on-bad-exit=1 \
      bash -c 'DGMR_PROCESS_ID=$SLURM_PROCID exec dgmr-jax distill "$@"' dgmr-jax \
      --config "$config" --workdir "$workdir" "$@"
    ;;
  env)
    slurm_env
    echo "DGMR_COORDINATOR=$SLURM_COORD"
    echo "DGMR_NUM_PROCESSES=$NUM_PROCESSES"
    echo "DGMR_PROCESS_ID=${SLURM_PROCID:-0}"
    ;;
  node)
    positional "$@"
    config=$1 workdir=$2
    shift 2
    run env "DGMR_COORDINATOR=${COORDINATOR:?COORDINATOR=host:port of node 0}" \
      "DGMR_NUM_PROCESSES=${NUM_NODES:?NUM_NODES=number of nodes}" \
      "DGMR_PROCESS_ID=${NODE_RANK:?NODE_RANK=this node, 0..NUM_NODES-1}" \
      dgmr-jax distill --config "$config" --workdir "$workdir" "$@"
    ;;
  *) die "unknown command '$cmd' (submit, run, env, node)" ;;
esac
