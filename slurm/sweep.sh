#!/usr/bin/env bash
# Hyper-parameter sweep as a Slurm job array: array task K trains with the K-th line of SWEEP below (plus
# the flags given to sbatch), through slurm/train.sh, so each task gets its own run directory
# runs/<job name>-<array job id>_<K>, its own port, the same preemption handling and self-requeue.
#
#   sbatch slurm/sweep.sh --config configs/fashion_mnist.yaml --epochs 10
#   sbatch --array=0-3%2 slurm/sweep.sh ...        # at most 2 tasks at a time
#
# Edit SWEEP (one line of flags per task) and keep --array=0-(lines-1). #SBATCH lines are defaults, as in
# train.sh (whose own #SBATCH header is not read here: set resources on this header or on the command line).
#
#SBATCH --job-name=disttrain-sweep
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
##SBATCH --partition=gpu
##SBATCH --account=my_project
##SBATCH --gpus-per-node=1
set -euo pipefail

SWEEP=(
  "--lr 1e-3 --batch-size 64"
  "--lr 3e-3 --batch-size 64"
  "--lr 1e-3 --batch-size 128"
  "--lr 3e-3 --batch-size 128"
)

K=${SLURM_ARRAY_TASK_ID:?submit with sbatch (an array job)}
[ "$K" -lt "${#SWEEP[@]}" ] || { echo "sweep.sh: no SWEEP line $K (${#SWEEP[@]} lines)" >&2; exit 2; }
read -r -a POINT <<<"${SWEEP[K]}"
ROOT=${DISTTRAIN_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
echo "sweep.sh: array task $K of job ${SLURM_ARRAY_JOB_ID:-?}: ${SWEEP[K]}"
# exec keeps this shell's pid, so --signal=B:USR1 reaches train.sh's trap
exec bash "$ROOT/slurm/train.sh" "${POINT[@]}" "$@"
