#!/usr/bin/env bash
# A SLURM job array whose tasks are plain `cqkd sweep` workers on one sweep directory: each task
# claims grid points one by one until none is left (docs/sweeps.md). The directory must be on a
# file system that every node sees, with file locks (NFS, Lustre, GPFS), at the same path.
#
#   sbatch --array=0-7 --cpus-per-task=4 scripts/slurm-sweep.sh configs/fashion-mnist-study.yaml runs/study
#   sbatch --array=0-3 --cpus-per-task=8 --gres=gpu:1 scripts/slurm-sweep.sh CONFIG.yaml DIR --stale-after 120
#
# Options after DIR go to `cqkd sweep`. The environment of `sbatch` is passed on (activate the
# virtual environment first), or set CQKD to the cqkd executable. Tasks may start at any time:
# a late task joins the running sweep; a task on a lost node is taken over after --stale-after.
#
#SBATCH --job-name=cqkd-sweep
#SBATCH --array=0-3
#SBATCH --cpus-per-task=4
#SBATCH --time=08:00:00
#SBATCH --output=cqkd-sweep-%A_%a.out
#SBATCH --signal=B:TERM@120
# (SIGTERM two minutes before the time limit: the worker saves a checkpoint of its run and records
#  it as interrupted; another task, or the next job on the same DIR, resumes it.)
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: sbatch [--array=0-N] [--cpus-per-task=C] [--gres=gpu:K] $0 CONFIG.yaml DIR [cqkd sweep options]" >&2
    exit 2
fi
config=$1
out=$2
shift 2
threads=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
echo "cqkd sweep worker: task ${SLURM_ARRAY_TASK_ID:-?} of job ${SLURM_ARRAY_JOB_ID:-?} on $(hostname)," \
     "$threads CPU threads, GPUs: ${CUDA_VISIBLE_DEVICES:-none}"
exec "${CQKD:-cqkd}" sweep "$config" --out "$out" --threads-per-worker "$threads" "$@"
