#!/usr/bin/env bash
# disttrain on a Slurm allocation: one srun task per node, each runs `python -m disttrain.launch`
# (accelerate launch + signal forwarding) for that node's processes. Flags go to disttrain.train:
#
#   sbatch slurm/train.sh --config configs/fashion_mnist.yaml --epochs 20
#   sbatch -N 4 --gpus-per-node=8 -t 12:00:00 slurm/train.sh --model resnet18 --dataset cifar10
#
# Every #SBATCH line below is a default: the same option on the sbatch command line wins.
# For a real cluster, change (or pass): partition, account, GPUs, time, cpus-per-task, memory.
# See slurm/README.md (preemption, requeue, logs, run directory).
#
#SBATCH --job-name=disttrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#    one task per node: accelerate starts that node's processes (GPUs, or CPU processes) itself
#SBATCH --cpus-per-task=2
#    real cluster: all cores of the node, or ~8-16 per GPU (data loading + threads)
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#    warning signal to this batch shell 120 s before the time limit: checkpoint, then requeue
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#    one log per job in the submit directory; append mode keeps every requeued attempt
##SBATCH --partition=gpu
##SBATCH --account=my_project
##SBATCH --gpus-per-node=8
##SBATCH --mem=0
#    (lines starting with ##SBATCH are ignored: remove one # to use them)
set -euo pipefail

# ---- site settings (uncomment what your cluster needs)
# export NCCL_SOCKET_IFNAME=ib0       # the network interface NCCL should use between nodes
# export GLOO_SOCKET_IFNAME=ib0       # the same for gloo (CPU jobs, and disttrain's stop agreement)
# export NCCL_DEBUG=WARN

PY=${DISTTRAIN_PYTHON:-python3}
MAX_REQUEUES=${DISTTRAIN_MAX_REQUEUES:-10}
MAX_RESTARTS=${DISTTRAIN_MAX_RESTARTS:-3}     # crashed worker groups started again in place (disttrain.launch)
RESTARTS=${SLURM_RESTART_COUNT:-0}
ROOT=${DISTTRAIN_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}                 # the disttrain checkout
LAUNCH_CONFIG=${DISTTRAIN_LAUNCH_CONFIG:-$ROOT/launch/multi-node.yaml}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

log() { echo "train.sh [$(date '+%F %T')] $*"; }
die() { log "error: $*" >&2; exit 2; }

command -v "$PY" >/dev/null || die "no python '$PY' (put one on PATH or set DISTTRAIN_PYTHON)"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "DISTTRAIN_MAX_RESTARTS must be a whole number >= 0, got '$MAX_RESTARTS'"
[ -f "$LAUNCH_CONFIG" ] || die "no launch config $LAUNCH_CONFIG (submit from the repo root, or set DISTTRAIN_HOME)"

# Processes per node: DISTTRAIN_PROCS_PER_NODE if set, else the node's GPUs, else 1 CPU process.
GPUS=${SLURM_GPUS_ON_NODE:-0}
PER_NODE=${DISTTRAIN_PROCS_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}
NPROC=$(( PER_NODE * NNODES ))

mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MAIN_ADDR=${HOSTS[0]}
PORT=${DISTTRAIN_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}       # from the job id: jobs sharing a node differ

# The run directory survives requeues: runs/<job name>-<job id> unless the flags name one.
FLAGS=("$@")
OUT=""
for ((i = 0; i < ${#FLAGS[@]}; i++)); do
  case ${FLAGS[i]} in
    --output-dir) OUT=${FLAGS[i + 1]:-} ;;
    --output-dir=*) OUT=${FLAGS[i]#--output-dir=} ;;
  esac
done
if [ -z "$OUT" ]; then
  RUN_ID=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
  OUT=runs/${SLURM_JOB_NAME}-${RUN_ID:-$SLURM_JOB_ID}
  FLAGS+=(--output-dir "$OUT")
fi
# --resume auto first: a requeued attempt continues from the newest checkpoint (an explicit --resume wins).
FLAGS=(--resume auto "${FLAGS[@]}")

log "job $SLURM_JOB_ID attempt $((RESTARTS + 1)) (SLURM_RESTART_COUNT=$RESTARTS): $NNODES node(s) x $PER_NODE" \
    "process(es) ($GPUS GPU(s)/node), main $MAIN_ADDR:$PORT, run dir $OUT, up to $MAX_RESTARTS in-place restart(s)"

# Bad flags fail here, once, with one line (exit 2), before any node starts anything.
"$PY" -c 'import sys; from disttrain.launch import check; sys.exit(check(sys.argv[1:]))' "${FLAGS[@]}" || {
  rc=$?; log "bad input (exit $rc): not requeued"; exit "$rc"; }

# ---- stop requests. USR1 = time limit near (--signal=B:USR1@...): this shell passes it on to the job
# steps (scancel --signal=USR1: every process of the srun step gets it; our launcher turns it into one
# SIGTERM for the workers), which finish the step, checkpoint and exit 75; then the job requeues itself.
# TERM = scancel or preemption: Slurm signals the steps itself; the training checkpoints and stops, and
# the job does not requeue itself. Each is passed on once: torchrun's agent dies of a second signal.
STOP=""
# shellcheck disable=SC2317  # invoked by the traps below
on_signal() {
  local first=${STOP:-yes}
  STOP=${STOP:-$1}
  log "got SIG$1"
  if [ "$first" = yes ] && [ "$1" = USR1 ]; then
    log "asking the training to checkpoint and stop (scancel --signal=USR1 $SLURM_JOB_ID)"
    scancel --signal=USR1 "$SLURM_JOB_ID" || true                # reaches the srun steps, not this shell
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# bash runs a trap only when the foreground command returns: run srun in the background and wait.
# The subshell records srun's exit code, which a wait interrupted by a trap would lose.
RCFILE=$(mktemp)
START=$(date +%s)
(
  rc=0
  # shellcheck disable=SC2016  # $SLURM_NODEID must expand on each node, inside the task
  srun --kill-on-bad-exit=1 --label --nodes="$NNODES" --ntasks-per-node=1 --ntasks="$NNODES" \
    bash -c 'exec "$0" -m disttrain.launch --max-restarts "$6" --config_file "$1" --num_machines "$2" \
                --num_processes "$3" --machine_rank "$SLURM_NODEID" --main_process_ip "$4" \
                --main_process_port "$5" -- "${@:7}"' \
    "$PY" "$LAUNCH_CONFIG" "$NNODES" "$NPROC" "$MAIN_ADDR" "$PORT" "$MAX_RESTARTS" "${FLAGS[@]}" || rc=$?
  echo "$rc" >"$RCFILE"
) &
CHILD=$!
while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD" || true; done
RC=$(cat "$RCFILE" 2>/dev/null || echo 1)
rm -f "$RCFILE"
RC=${RC:-1}
# The trainer's own verdict wins over srun's code (srun reports a signal when it had to end a slower
# node's task): status.json, if this attempt wrote it.
STATUS_RC=$("$PY" - "$OUT/status.json" "$START" <<'EOF' || true
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    if float(s["time"]) >= float(sys.argv[2]) - 5:
        print(int(s["exit_code"]))
except Exception:
    pass
EOF
)
RC=${STATUS_RC:-$RC}

case $RC in
  0) log "training completed" ;;
  2) log "bad input (exit 2): not requeued" ;;
  75) log "training stopped after a checkpoint (exit 75)" ;;
  *) log "training failed (exit $RC)" ;;
esac
if [ "$STOP" = USR1 ] && [ "$RC" != 0 ] && [ "$RC" != 2 ]; then
  if [ "$RESTARTS" -lt "$MAX_REQUEUES" ]; then
    log "requeueing job $SLURM_JOB_ID (restart $((RESTARTS + 1)) of at most $MAX_REQUEUES); it resumes from $OUT"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  log "not requeueing: $RESTARTS restarts already (DISTTRAIN_MAX_REQUEUES=$MAX_REQUEUES)"
fi
exit "$RC"
