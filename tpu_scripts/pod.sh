#!/usr/bin/env bash
# Run a dgmr-jax distillation on a Cloud TPU pod slice, from a machine with gcloud (docs/pod.md):
#   plan (here, no TPU) -> create -> setup -> launch -> logs ... delete
#   tpu_scripts/pod.sh all --name my-v5p --zone us-east5-a --accelerator-type v5p-128 --spot \
#       --config configs/eva02_clip_e_prune1.py --workdir gs://bucket/runs/eva_e_prune1 -- --config.x=y
# Every worker runs the same command with DGMR_TPU_POD=1 (jax.distributed.initialize() with the pod's own
# discovery) and the same gs:// workdir, so running `launch` again after a preemption resumes the run.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu_scripts/pod.sh COMMAND [options] [-- OVERRIDES...]

commands:
  plan     compile the train step for the slice's topology on this machine (no TPU); fails if it
           does not fit HBM
  create   create the TPU VM slice (tpu-vm create, or a queued resource with --queued, then wait)
  wait     wait until the queued resource is ACTIVE
  setup    copy this checkout's tracked files (or clone --git URL) to every worker, pip install it with
           jax[tpu]; untracked files go too up to 1 MiB each, larger ones are named and left out
  launch   start distill on every worker under nohup, log in ~/dgmr-distill.log on each worker
  logs     follow one worker's log (--worker, default 0); Ctrl-C leaves the run going
  status   describe the TPU VM (or the queued resource)
  delete   tear the TPU VM (or the queued resource and its VM) down
  all      plan, create, setup, launch, logs (--skip-plan leaves out plan)

options [environment variable]:
  --name NAME              TPU VM / queued resource name               [TPU_NAME]
  --zone ZONE              e.g. us-east5-a                             [ZONE]
  --project PROJECT        default: gcloud's configured project        [PROJECT]
  --accelerator-type TYPE  e.g. v5p-128, v5litepod-64 (or v5e-64)      [ACCELERATOR_TYPE]
  --version VERSION        TPU runtime; default from TYPE (v5p: v2-alpha-tpuv5) [RUNTIME_VERSION]
  --topology TOPOLOGY      for plan; default from TYPE (v5p-128: v5p:4x4x4)     [TOPOLOGY]
  --spot | --preemptible   spot (or legacy preemptible) capacity       [SPOT=1 | PREEMPTIBLE=1]
  --queued                 go through a queued resource (with --spot)  [QUEUED=1]
  --service-account EMAIL  the workers' identity (scope cloud-platform) [SERVICE_ACCOUNT]
  --config FILE            recipe, e.g. configs/eva02_clip_e_prune1.py [CONFIG]
  --workdir gs://B/RUN     the run's workdir; must be gs://            [WORKDIR]
  --git URL                setup clones URL instead of copying this checkout [GIT_URL]
  --git-ref REF            commit or tag to check out after the clone  [GIT_REF]
  --worker N               the worker `logs` follows (default 0)       [WORKER]
  --skip-plan              `all` without the plan step                 [SKIP_PLAN=1]
  --dry-run                print every command ("+ " then the command) and run none
  -h, --help               this text
Everything after `--` goes to both `dgmr-jax plan` and `dgmr-jax distill` (--config.a.b=value ...).
EOF
}

die() {
  echo "pod.sh: $*" >&2
  exit 2
}

# Shell-quote one word so that the printed command line can be pasted back into a shell.
q() {
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

# Print a command line: on stdout with --dry-run, else on stderr (as set -x would) before it runs.
show() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
  fi
}

# Print the command; run it unless --dry-run.
run() {
  show "$(qargs "$@")"
  [[ $DRY_RUN == 1 ]] || "$@"
}

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
TOPOLOGY=${TOPOLOGY:-}
SPOT=${SPOT:-0}
PREEMPTIBLE=${PREEMPTIBLE:-0}
QUEUED=${QUEUED:-0}
SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-}
WORKER=${WORKER:-0}
SKIP_PLAN=${SKIP_PLAN:-0}
DRY_RUN=${DRY_RUN:-0}
POLL_SECONDS=${POLL_SECONDS:-60} # queued resource: seconds between two looks at its state
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC2088  # the tilde is for the worker's shell
REMOTE_DIR='~/dgmr-jax'
# shellcheck disable=SC2088
REMOTE_LOG='~/dgmr-distill.log'
INSTALL='python3 -m pip install -q -c constraints.txt -e ".[gcs]" "jax[tpu]"'
CLOUD_PLATFORM=https://www.googleapis.com/auth/cloud-platform
UNTRACKED_MAX_KIB=1024 # setup ships an untracked (not ignored) file only up to this size

cmd=""
G=()
overrides=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name) TPU_NAME=${2:?--name needs a value}; shift ;;
    --zone) ZONE=${2:?--zone needs a value}; shift ;;
    --project) PROJECT=${2:?--project needs a value}; shift ;;
    --accelerator-type) ACCELERATOR_TYPE=${2:?--accelerator-type needs a value}; shift ;;
    --version) RUNTIME_VERSION=${2:?--version needs a value}; shift ;;
    --topology) TOPOLOGY=${2:?--topology needs a value}; shift ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --queued) QUEUED=1 ;;
    --service-account) SERVICE_ACCOUNT=${2:?--service-account needs a value}; shift ;;
    --config) CONFIG=${2:?--config needs a value}; shift ;;
    --workdir) WORKDIR=${2:?--workdir needs a value}; shift ;;
    --git) GIT_URL=${2:?--git needs a value}; shift ;;
    --git-ref) GIT_REF=${2:?--git-ref needs a value}; shift ;;
    --worker) WORKER=${2:?--worker needs a value}; shift ;;
    --skip-plan) SKIP_PLAN=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; overrides=("$@"); break ;;
    -*) die "unknown option $1 (overrides for distill go after --; see -h)" ;;
    *)
      [[ -z $cmd ]] || die "one command at a time (got '$cmd' and '$1')"
      cmd=$1
      ;;
  esac
  shift
done

# Cloud names a v5e slice v5litepod-N; v5e-N (as the docs and `plan --topology v5e:...` say it) means the same
if [[ $ACCELERATOR_TYPE == v5e-* ]]; then
  ACCELERATOR_TYPE=v5litepod-${ACCELERATOR_TYPE#v5e-}
  echo "pod.sh: --accelerator-type v5e-${ACCELERATOR_TYPE#v5litepod-} is $ACCELERATOR_TYPE to Cloud" >&2
fi

# ---------------------------------------------------------------------------------------------- checks
need() { # need VALUE FLAG/VAR
  [[ -n $1 ]] || die "$2 is required for '$cmd' (see -h)"
}

check_workdir() {
  need "$WORKDIR" "--workdir gs://BUCKET/RUN [WORKDIR]"
  [[ $WORKDIR == gs://?* ]] || die "the workdir must be a gs:// path on a TPU pod, got '$WORKDIR': every \
worker must write and resume from the same checkpoints, and a worker's local disk is lost with the VM \
(preemption, delete). Use --workdir gs://BUCKET/RUN."
}

check_capacity() {
  [[ $SPOT == 1 && $PREEMPTIBLE == 1 ]] && die "--spot and --preemptible exclude each other"
  [[ $QUEUED == 1 && $PREEMPTIBLE == 1 ]] && die "queued resources take --spot, not --preemptible"
  return 0
}

runtime_version() {
  if [[ -n $RUNTIME_VERSION ]]; then
    echo "$RUNTIME_VERSION"
    return
  fi
  case $ACCELERATOR_TYPE in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime for accelerator type '$ACCELERATOR_TYPE'; pass --version" ;;
  esac
}

# Default physical topology of a slice, as `dgmr-jax plan --topology` takes it (e.g. v5p-128 -> v5p:4x4x4).
topology() {
  if [[ -n $TOPOLOGY ]]; then
    echo "$TOPOLOGY"
    return
  fi
  local gen=${ACCELERATOR_TYPE%-*} n=${ACCELERATOR_TYPE##*-} t=""
  [[ $n =~ ^[0-9]+$ ]] || die "cannot read a size from accelerator type '$ACCELERATOR_TYPE'; pass --topology"
  case $gen in
    v4 | v5p) # the size counts TensorCores, two per chip; 3D torus
      case $((n / 2)) in
        4) t=2x2x1 ;; 8) t=2x2x2 ;; 16) t=2x2x4 ;; 32) t=2x4x4 ;; 64) t=4x4x4 ;; 128) t=4x4x8 ;;
        256) t=4x8x8 ;; 512) t=8x8x8 ;; 768) t=8x8x12 ;; 1024) t=8x8x16 ;; 2048) t=8x16x16 ;;
        4096) t=16x16x16 ;; 6144) t=16x16x24 ;;
      esac
      ;;
    v5litepod | v6e) # the size counts chips; 2D
      [[ $gen == v5litepod ]] && gen=v5e
      case $n in
        1) t=1x1 ;; 4) t=2x2 ;; 8) t=2x4 ;; 16) t=4x4 ;; 32) t=4x8 ;; 64) t=8x8 ;; 128) t=8x16 ;; 256) t=16x16 ;;
      esac
      ;;
  esac
  [[ -n $t ]] || die "no default topology for accelerator type '$ACCELERATOR_TYPE'; pass --topology (e.g. v5p:4x4x4)"
  echo "$gen:$t"
}

check_node() { # and set G, the zone and project flags of every gcloud command
  need "$TPU_NAME" "--name [TPU_NAME]"
  need "$ZONE" "--zone [ZONE]"
  G=(--zone "$ZONE")
  [[ -z $PROJECT ]] || G+=(--project "$PROJECT")
}

# ------------------------------------------------------------------------------------------- commands
do_plan() {
  need "$CONFIG" "--config [CONFIG]"
  local topo
  topo=$(topology)
  run dgmr-jax plan --config "$CONFIG" --topology "$topo" ${overrides[@]+"${overrides[@]}"}
}

do_wait() {
  if [[ $QUEUED != 1 ]]; then # tpu-vm create returns once the VM is up: nothing to wait for
    [[ $cmd == wait ]] && die "'wait' waits for a queued resource: add --queued (a plain 'create' returns once \
the TPU VM is up)"
    return 0
  fi
  local describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${G[@]}" --format='value(state.state)')
  if [[ $DRY_RUN == 1 ]]; then
    run "${describe[@]}" # polled every POLL_SECONDS until ACTIVE
    return
  fi
  local state
  while :; do
    state=$(run "${describe[@]}") || state="unknown (describe failed)"
    case $state in
      ACTIVE) echo "pod.sh: queued resource $TPU_NAME is ACTIVE" >&2; return ;;
      FAILED | SUSPENDED | SUSPENDING) die "queued resource $TPU_NAME is $state; 'delete' it and 'create' again" ;;
    esac
    echo "pod.sh: queued resource $TPU_NAME is ${state:-unknown}; next look in $POLL_SECONDS s (Ctrl-C is \
safe: the request stays queued, 'wait' resumes waiting)" >&2
    sleep "$POLL_SECONDS"
  done
}

do_create() {
  need "$ACCELERATOR_TYPE" "--accelerator-type [ACCELERATOR_TYPE]"
  check_capacity
  local version extra=()
  version=$(runtime_version)
  [[ $SPOT == 1 ]] && extra=(--spot)
  [[ $PREEMPTIBLE == 1 ]] && extra=(--preemptible)
  # the workers' identity: with the cloud-platform scope, the account's IAM roles alone decide what it may do
  [[ -z $SERVICE_ACCOUNT ]] || extra+=(--service-account "$SERVICE_ACCOUNT" --scopes "$CLOUD_PLATFORM")
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" "${G[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$version" ${extra[@]+"${extra[@]}"}
    do_wait
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${G[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --version "$version" ${extra[@]+"${extra[@]}"}
  fi
}

ssh_workers() { # ssh_workers all|N REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${G[@]}" "--worker=$1" --command "$2"
}

# The files setup ships, one a line: every tracked file as it is in the working tree (uncommitted edits
# included, files deleted there left out) and every untracked, not ignored file up to UNTRACKED_MAX_KIB (a
# recipe not yet added); larger untracked files (data, checkpoints) are named in one line on stderr and left out.
ship_list() {
  local f size big=()
  while IFS= read -r -d '' f; do
    if [[ -e $REPO/$f ]]; then printf '%s\n' "$f"; fi
  done < <(git -C "$REPO" ls-files -z --cached)
  while IFS= read -r -d '' f; do
    [[ -f $REPO/$f ]] || continue # a nested repository ("dir/"): not ours to ship
    size=$(wc -c <"$REPO/$f")
    if ((size > UNTRACKED_MAX_KIB * 1024)); then
      big+=("$f ($(((size + 524288) / 1048576)) MiB)")
    else
      printf '%s\n' "$f"
    fi
  done < <(git -C "$REPO" ls-files -z --others --exclude-standard)
  if ((${#big[@]})); then
    local joined
    joined=$(printf ', %s' "${big[@]}")
    echo "pod.sh: setup leaves out ${#big[@]} untracked file(s) over $UNTRACKED_MAX_KIB KiB: ${joined:2} (git add \
what the workers need; .gitignore the rest)" >&2
  fi
}

do_setup() {
  local install="cd $REMOTE_DIR && $INSTALL"
  if [[ -n $GIT_URL ]]; then
    local fetch
    if [[ -n $GIT_REF ]]; then
      fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin; else git clone -q $(q "$GIT_URL") \
$REMOTE_DIR; fi && git -C $REMOTE_DIR checkout -q $(q "$GIT_REF")"
    else
      fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull -q --ff-only; else git clone -q $(q "$GIT_URL") \
$REMOTE_DIR; fi"
    fi
    ssh_workers all "$fetch && $install"
    return
  fi
  # Copy the checkout as one tarball (no .git): see ship_list
  local tarball="${TMPDIR:-/tmp}/dgmr-jax-src-$TPU_NAME.tgz"
  if [[ -e $REPO/.git ]]; then
    local list="${TMPDIR:-/tmp}/dgmr-jax-src-$TPU_NAME.files" files
    files=$(ship_list)
    show "$(qargs git -C "$REPO" ls-files --cached --others --exclude-standard) > $(q "$list")"
    [[ $DRY_RUN == 1 ]] || printf '%s\n' "$files" >"$list"
    run tar -C "$REPO" -czf "$tarball" -T "$list"
  else
    run tar -C "$REPO" -czf "$tarball" --exclude=./.git .
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:dgmr-jax-src.tgz" "${G[@]}" --worker=all
  ssh_workers all "mkdir -p $REMOTE_DIR && tar -xzf ~/dgmr-jax-src.tgz -C $REMOTE_DIR && $install"
}

do_launch() {
  need "$CONFIG" "--config [CONFIG]"
  check_workdir
  local distill
  distill=$(qargs dgmr-jax distill --config "$CONFIG" --workdir "$WORKDIR" ${overrides[@]+"${overrides[@]}"})
  ssh_workers all "cd $REMOTE_DIR && export PATH=\"\$HOME/.local/bin:\$PATH\" && \
(nohup env DGMR_TPU_POD=1 $distill >> $REMOTE_LOG 2>&1 < /dev/null &)"
  [[ $DRY_RUN == 1 ]] || echo "pod.sh: distill started on every worker of $TPU_NAME; follow it: pod.sh logs" >&2
}

do_logs() {
  ssh_workers "$WORKER" "tail -n 200 -F $REMOTE_LOG"
}

do_status() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$TPU_NAME" "${G[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${G[@]}"
  fi
}

do_delete() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" "${G[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${G[@]}" --quiet
  fi
}

case $cmd in
  plan) do_plan ;;
  create) check_node; do_create ;;
  wait) check_node; do_wait ;;
  setup) check_node; do_setup ;;
  launch) check_node; do_launch ;;
  logs) check_node; do_logs ;;
  status) check_node; do_status ;;
  delete) check_node; do_delete ;;
  all)
    # every check before the first command: a typo must not cost a created slice
    check_node
    need "$ACCELERATOR_TYPE" "--accelerator-type [ACCELERATOR_TYPE]"
    need "$CONFIG" "--config [CONFIG]"
    check_workdir
    check_capacity
    runtime_version >/dev/null
    if [[ $SKIP_PLAN != 1 ]]; then
      topology >/dev/null
      do_plan
    fi
    do_create
    do_setup
    do_launch
    do_logs
    ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command '$cmd' (plan, create, wait, setup, launch, logs, status, delete, all)" ;;
esac
