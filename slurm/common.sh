# shellcheck shell=bash
# Sourced by the slurm/*.sbatch scripts (after their "EDIT THESE" block): set-up, the master
# address, and the launcher run so that the job checkpoints, stops and requeues before its time
# limit. Not a job script itself.
#
# Stopping (ptuning_dist/train/stop.py): training stops at its next log step when <OUTPUT_DIR>/STOP
# exists (or on SIGUSR1/SIGTERM to a training process), writes a checkpoint of that step and exits
# 99. The scripts ask for `#SBATCH --signal=B:USR1@300`: Slurm signals only this batch shell (a
# torchrun agent would die of SIGUSR1 itself), whose trap creates the STOP file, which every rank
# on every node sees (OUTPUT_DIR is on the shared filesystem). The launcher runs in the background
# so the trap runs at once (bash runs traps only between foreground commands).
#
#   batch shell got  | launcher ended as                 | this script
#   SIGUSR1          | stopped (see ptd_stopped)         | `scontrol requeue $SLURM_JOB_ID`, exit 99
#   SIGTERM          | stopped                           | exit 99, no requeue (scancel: the user's
#                    |                                   | stop; preemption: Slurm requeues itself)
#   nothing          | stopped (a STOP file made by hand)| exit 99, no requeue
#   anything         | failed / finished                 | exit with the launcher's code
#
# A launcher that ends before its ranks (deepspeed's runner dies of a SIGTERM at once; a killed
# torchrun leaves its workers, which then stop by themselves) is waited for: ptd_run waits, at most
# PTD_STOP_WAIT_S (120) s, until no process with `--output_dir $OUTPUT_DIR` is left.
#
# The requeued job (same job id) starts this script again; `--resume auto` continues from the
# newest good checkpoint.

ptd_log() { printf '[slurm %s] %s\n' "$(date '+%F %T')" "$*"; }
ptd_die() { printf '[slurm] error: %s\n' "$*" >&2; exit 2; }

# cd to the clone, pick python/torchrun, threads per process, the training arguments (PTD_TRAIN).
# $1: training processes per task (1 under srun one-task-per-GPU; GPUS_PER_NODE under torchrun).
ptd_setup() {
  local procs_per_task=${1:-1} extra arg
  cd "$REPO_DIR" || ptd_die "REPO_DIR=$REPO_DIR: no such directory (set it in the EDIT block)"
  [[ -f launchers/train.py ]] || ptd_die "REPO_DIR=$REPO_DIR holds no launchers/train.py (set it in the EDIT block)"
  if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
  fi
  if [[ -z ${TORCHRUN:-} ]]; then  # the torchrun beside that python, else the one on PATH
    if [[ $PYTHON == */* && -x ${PYTHON%/*}/torchrun ]]; then TORCHRUN=${PYTHON%/*}/torchrun; else TORCHRUN=torchrun; fi
  fi
  if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$procs_per_task} / procs_per_task ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
  fi
  export OMP_NUM_THREADS PYTHONUNBUFFERED=1
  # Slurm >= 22.05: srun no longer inherits sbatch's --cpus-per-task
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  mkdir -p "$OUTPUT_DIR"
  if [[ -e $OUTPUT_DIR/STOP ]]; then  # the stop request of the run before a requeue
    ptd_log "removing $OUTPUT_DIR/STOP (left by an earlier run)"
    rm -f "$OUTPUT_DIR/STOP"
  fi
  rm -f "$OUTPUT_DIR/STOPPED"  # the marker of an earlier stop: only this run's may count
  # From here on SIGUSR1/SIGTERM are stop requests (they no longer kill this shell), until it exits.
  PTD_GOT_USR1=0 PTD_GOT_TERM=0
  trap 'ptd_on_signal USR1' USR1
  trap 'ptd_on_signal TERM' TERM

  PTD_TRAIN=()
  if [[ -n ${CONFIG:-} ]]; then PTD_TRAIN+=(--config "$CONFIG"); fi
  PTD_TRAIN+=(--output_dir "$OUTPUT_DIR")
  if [[ -n ${MODEL:-} ]]; then PTD_TRAIN+=(--model "$MODEL"); fi
  if [[ -n ${DS_CONFIG:-} ]]; then PTD_TRAIN+=(--ds_config "$DS_CONFIG"); fi
  if [[ -n ${BACKEND:-} ]]; then PTD_TRAIN+=(--backend "$BACKEND"); fi
  if [[ -n ${TP:-} ]]; then PTD_TRAIN+=(--tp "$TP"); fi
  if [[ -n ${PP:-} ]]; then PTD_TRAIN+=(--pp "$PP"); fi
  read -r -a extra <<< "${TRAIN_ARGS:-}"  # split on blanks: put values with spaces (templates) in CONFIG
  for arg in "${extra[@]}"; do
    case $arg in
      --output_dir|--output_dir=*) ptd_die "TRAIN_ARGS: set OUTPUT_DIR instead of --output_dir (the stop file and checkpoints are looked for there)" ;;
      --resume|--resume=*) ptd_die "TRAIN_ARGS: no --resume: the scripts always pass --resume auto" ;;
    esac
  done
  PTD_TRAIN+=("${extra[@]}" --resume auto)  # last: every (re)start continues from the newest good checkpoint

  ptd_log "job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}" \
          "(${SLURM_NNODES:-1} nodes); repo $PWD; output $OUTPUT_DIR; OMP_NUM_THREADS=$OMP_NUM_THREADS"
}

# MASTER_ADDR: the first host of the job's node list (where node rank / rank 0 runs), unless set;
# MASTER_PORT: 20000 + job id % 20000 unless set (the formula ptuning_dist/parallel/launch.py uses).
ptd_master() {
  local hosts
  if [[ -z ${MASTER_ADDR:-} ]]; then
    [[ -n ${SLURM_JOB_NODELIST:-} ]] || ptd_die "not inside a Slurm job (no SLURM_JOB_NODELIST): set MASTER_ADDR"
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || ptd_die "scontrol show hostnames $SLURM_JOB_NODELIST failed"
    MASTER_ADDR=${hosts%%$'\n'*}
    [[ -n $MASTER_ADDR ]] || ptd_die "scontrol show hostnames $SLURM_JOB_NODELIST printed no host"
  fi
  if [[ -z ${MASTER_PORT:-} ]]; then
    MASTER_PORT=$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))
  fi
  export MASTER_ADDR MASTER_PORT
  ptd_log "master $MASTER_ADDR:$MASTER_PORT"
}

# The step of the newest complete checkpoint in OUTPUT_DIR (0: none).
ptd_newest_checkpoint() {
  local d n newest=0
  for d in "$OUTPUT_DIR"/checkpoints/step_*; do
    if [[ -d $d && ${d##*/} =~ ^step_([0-9]{8})$ ]]; then
      n=$(( 10#${BASH_REMATCH[1]} ))
      if (( n > newest )); then newest=$n; fi
    fi
  done
  echo "$newest"
}

ptd_on_signal() {
  ptd_log "got SIG$1: asking training to checkpoint and stop at its next log step ($OUTPUT_DIR/STOP)"
  if [[ $1 == USR1 ]]; then PTD_GOT_USR1=1; else PTD_GOT_TERM=1; fi
  : > "$OUTPUT_DIR/STOP" || ptd_log "warning: cannot create $OUTPUT_DIR/STOP"
}

# Did the launcher stop on request (checkpoint written)? Exit 99 says so; so does the STOPPED marker
# rank 0 writes after the stop checkpoint (torchrun reports 1 whatever its workers' codes, and
# srun --kill-on-bad-exit may report the signal it killed the last tasks with). Without the marker,
# a stop request that is still there plus a checkpoint newer than the launch says so too.
ptd_stopped() {
  local rc=$1 before=$2 now
  (( rc == 99 )) && return 0
  if (( rc != 0 )) && [[ -e $OUTPUT_DIR/STOPPED ]]; then
    ptd_log "the launcher exited $rc; training says it stopped on request: $(cat "$OUTPUT_DIR/STOPPED")"
    return 0
  fi
  (( rc != 0 )) && [[ -e $OUTPUT_DIR/STOP ]] || return 1
  now=$(ptd_newest_checkpoint)
  if (( now > before )); then
    ptd_log "the launcher exited $rc after a stop request and checkpoint step $now was written since it" \
            "started (torchrun reports 1 for workers that exit 99): taking it as stopped"
    return 0
  fi
  return 1
}

# True while a training process of this run still runs: one, other than this shell and its
# children, whose command line has `--output_dir $OUTPUT_DIR` (a rank, deepspeed's launch.py; even
# torchrun's workers, which sit in sessions of their own). Reads /proc (Linux) with builtins only.
ptd_left_behind() {
  local f line prev arg
  local -a st
  for f in /proc/[0-9]*; do
    [[ ${f#/proc/} != "$$" ]] || continue
    read -r line 2>/dev/null < "$f/stat" || continue
    line=${line##*) }; read -r -a st <<< "$line"  # after "(comm)": state ppid ...
    [[ ${st[0]} != Z && ${st[1]} != "$$" ]] || continue
    prev=
    while IFS= read -r -d '' arg; do
      if [[ $prev == --output_dir && $arg == "$OUTPUT_DIR" ]]; then return 0; fi
      prev=$arg
    done 2>/dev/null < "$f/cmdline"
  done
  return 1
}

# Run the launcher "$@" until it ends (this shell's SIGUSR1/SIGTERM are stop requests: ptd_setup's
# traps); exits the script (99 if training stopped on request, after requeueing on SIGUSR1).
ptd_run() {
  local before rc=0 pid
  before=$(ptd_newest_checkpoint)
  ptd_log "running: $(printf '%q ' "$@")"
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if (( PTD_GOT_USR1 || PTD_GOT_TERM )) && [[ ! -e $OUTPUT_DIR/STOP ]]; then
      # rank 0 removes a STOP file it finds at start-up (a stale one, it thinks): say it again
      : > "$OUTPUT_DIR/STOP" || true
    fi
    sleep "${PTD_POLL_S:-2}" >/dev/null 2>&1 &
    wait "$!" || true  # returns early when a trapped signal arrives
  done
  wait "$pid" || rc=$?
  if (( rc != 0 && rc != 99 )) && ptd_left_behind; then
    # the launcher died first: deepspeed's runner dies of a SIGTERM at once while launch.py and the
    # ranks still write the stop checkpoint (then STOPPED); a killed torchrun leaves its workers,
    # which stop by themselves (train/stop.py). Leaving now would let Slurm kill them mid-write.
    ptd_log "the launcher exited $rc but processes it started still run: waiting for them (at most ${PTD_STOP_WAIT_S:-120} s)"
    local until=$(( SECONDS + ${PTD_STOP_WAIT_S:-120} ))
    while ptd_left_behind && (( SECONDS < until )); do
      sleep "${PTD_POLL_S:-2}" >/dev/null 2>&1 &
      wait "$!" || true
    done
  fi
  if ! ptd_stopped "$rc" "$before"; then
    ptd_log "launcher exited $rc"
    exit "$rc"
  fi
  ptd_log "training stopped on request; its checkpoint (step $(ptd_newest_checkpoint)) is written"
  if (( PTD_GOT_USR1 && !PTD_GOT_TERM )) && [[ ${REQUEUE:-1} == 1 && -n ${SLURM_JOB_ID:-} ]]; then
    ptd_log "requeueing job $SLURM_JOB_ID: it continues with --resume auto"
    scontrol requeue "$SLURM_JOB_ID" || ptd_log "warning: scontrol requeue $SLURM_JOB_ID failed; resubmit this script"
  else
    ptd_log "not requeued (REQUEUE=${REQUEUE:-1}; SIGUSR1 $PTD_GOT_USR1, SIGTERM $PTD_GOT_TERM): resubmit to continue"
  fi
  exit 99
}
