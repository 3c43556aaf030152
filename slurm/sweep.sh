#!/usr/bin/env bash
# The Fine-Pruning sweep as one SLURM job. Submit from a shell whose environment has this project
# installed (make setup's .venv activated, the conda env fine-pruning, a pip install): sbatch
# passes that environment to the job. From any folder, by this script's path or a link to it
# (relative paths in the sweep args, and the job's log, are then that folder's; with sbatch -D
# DIR, DIR's):
#
#   sbatch slurm/sweep.sh [sweep args]
#   sbatch slurm/sweep.sh --model bd_net.h5 --data data/ --out /scratch/$USER/fine-pruning-run1
#   cd /scratch/$USER && sbatch ~/fine-pruning/slurm/sweep.sh --model bd_net.h5 --data data/ --out run1
#   sbatch -D /scratch/$USER ~/fine-pruning/slurm/sweep.sh --model bd_net.h5 --data data/ --out run1
#   sbatch --gres=none slurm/sweep.sh ...                 # CPU-only partition
#   sbatch -p gpu -A proj42 --time=12:00:00 slurm/sweep.sh ...   # options on the command line win
#
# Outputs go to --out (default: results/ in the job's folder: the submit directory or -D's); give
# a folder on shared scratch for big runs, as above (your shell expands $USER). The job's log is
# fine-pruning-<jobid>.out in that folder; a requeued job appends to it.
#
# How the tasks are used: `srun python -m jobs.sweep --slurm-runner` starts one Python per task
# and dask_jobqueue's SLURMRunner gives them roles: rank 0 the Dask scheduler (dashboard on port
# 8787 of the first node's loopback), rank 1 the client that runs the sweep, ranks 2.. one worker
# each. They talk TLS with a key rank 0 makes for each start of the job (docs/security.md).
# So --ntasks = 2 + workers, and at least 3.
#
# GPUs: --gpus-per-task=1 would also give GPUs to the scheduler and client ranks, so instead the
# job asks for the node's GPUs (--gres=gpu:2, one per worker rank), srun hands every task the
# whole set, and each task keeps one GPU if it is a worker, none if it is rank 0 or 1 (bind_gpu
# below). With N GPUs per node: --gres=gpu:N --ntasks=N+2.
# One node; for more GPUs than a node has use `python -m jobs.sweep --slurm-cluster N` on a login node.
# Scheduler and client need little: the CPUs/memory they are given here sit mostly idle.
#
# Near the time limit SLURM signals this script (--signal), which requeues the job; the rerun
# reads finished work back from --out's checkpoints. At most $MAX_REQUEUES times (default 3; set it
# when you submit: MAX_REQUEUES=5 sbatch slurm/sweep.sh ...).
#
#SBATCH --job-name=fine-pruning
#SBATCH --time=04:00:00
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=4
#SBATCH --mem-per-cpu=4G
#SBATCH --gres=gpu:2
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

say() { echo "sweep.sh: $*"; }

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    say "error: run me with sbatch: sbatch slurm/sweep.sh [sweep args]" >&2
    exit 2
fi
# The job runs in its working folder (the submit folder, or sbatch -D's): not changed here.
submit_dir=${SLURM_SUBMIT_DIR:-$PWD}
# This job to scontrol (for its time limit): an array task by its array's id and index, as the
# one task whose SLURM_JOB_ID is the array's id would stand for every task of the array.
job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}}
job=${job:-$SLURM_JOB_ID}
job_info=$(scontrol show job "$job" 2>/dev/null) || job_info=

# The Python that runs the sweep, and with it the environment. sbatch hands the job the submitting
# shell's environment (its default, --export=ALL), so the first of these that can import this
# project: $FINE_PRUNING_PYTHON (set it when you submit), the python on that PATH (an activated
# venv or conda env), the submit folder's .venv (make setup, submitted from the checkout), the
# conda env fine-pruning (environment.yml).
holds_project() {   # this project and what it needs (the checks only look: no import takes long)
    "$1" -c 'import importlib.util, sys
sys.exit(not all(importlib.util.find_spec(m) for m in ("jobs.sweep", "distributed", "tensorflow")))' >/dev/null 2>&1
}
set +u   # activation scripts read unset variables
python=
if [[ -n ${FINE_PRUNING_PYTHON:-} ]]; then
    if ! holds_project "$FINE_PRUNING_PYTHON"; then
        say "error: FINE_PRUNING_PYTHON=$FINE_PRUNING_PYTHON cannot import this project: give the python of an environment it is installed in" >&2
        exit 2
    fi
    python=$FINE_PRUNING_PYTHON
elif holds_project python; then
    python=python
elif holds_project "$submit_dir/.venv/bin/python"; then
    source "$submit_dir/.venv/bin/activate"
    python=python
elif command -v conda >/dev/null 2>&1 \
        && conda env list 2>/dev/null | awk '$1 == "fine-pruning" {found = 1} END {exit !found}'; then
    source "$(conda info --base)/etc/profile.d/conda.sh"
    conda activate fine-pruning
    holds_project python && python=python
fi
set -u
if [[ -z $python ]]; then
    say "error: no Python here can import this project: activate its environment before sbatch (source .venv/bin/activate, or conda activate fine-pruning), or FINE_PRUNING_PYTHON=PATH/TO/python sbatch slurm/sweep.sh ..." >&2
    exit 2
fi
python=$(command -v -- "$python")

args=("$@")
for arg in "${args[@]}"; do
    case $arg in
        -h|--help) exec "$python" -m jobs.sweep --help ;;   # once, not from every rank
        --single-node|--slurm-runner|--slurm-cluster|--slurm-cluster=*|--scheduler-address|--scheduler-address=*|--scheduler-file|--scheduler-file=*)
            say "error: $arg: this script chooses where the sweep runs (its own SLURM tasks); drop $arg" >&2
            exit 2 ;;
        --workers|--workers=*)
            say "error: $arg: this script's workers are its SLURM tasks after the first two: sbatch --ntasks=2+WORKERS" >&2
            exit 2 ;;
    esac
done
if [[ ! ${MAX_REQUEUES:-3} =~ ^[0-9]+$ ]]; then   # read only at the time limit's warning: checked now
    say "error: MAX_REQUEUES=$MAX_REQUEUES: give a whole number of requeues, e.g. MAX_REQUEUES=5 sbatch slurm/sweep.sh ..." >&2
    exit 2
fi
max_requeues=$(( 10#${MAX_REQUEUES:-3} ))   # 08 is eight, not a bad octal number
if (( ${SLURM_NTASKS:-1} < 3 )); then   # RUNNER_TASKS in jobs/cluster.py
    say "error: the job has ${SLURM_NTASKS:-1} tasks; it needs at least 3 (Dask scheduler, client, one worker or more): sbatch --ntasks=2+WORKERS" >&2
    exit 2
fi
case " ${args[*]-} " in
    *" --out "*|*" --out="*) ;;
    *) args+=(--out results) ;;
esac

export TF_FORCE_GPU_ALLOW_GROWTH=true   # TensorFlow takes GPU memory as it needs it, not all at once
say "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} tasks" \
    "(scheduler, client, $(( SLURM_NTASKS - 2 )) worker$( (( SLURM_NTASKS == 3 )) || echo s)), GPUs: ${CUDA_VISIBLE_DEVICES:-none}, python: $python"
printf -v shown ' %q' "${args[@]}"   # quoted as a shell reads it: the line can be pasted back
say "python -m jobs.sweep --slurm-runner$shown"

seconds() {  # SLURM's [D-]HH:MM:SS in seconds; nothing for UNLIMITED and the like
    [[ $1 =~ ^(([0-9]+)-)?([0-9]+):([0-9]+):([0-9]+)$ ]] || return 0
    echo $(( ((${BASH_REMATCH[2]:-0} * 24 + 10#${BASH_REMATCH[3]}) * 60 + 10#${BASH_REMATCH[4]}) * 60 + 10#${BASH_REMATCH[5]} ))
}
# The warning comes 5 minutes before the limit (--signal=B:USR1@300 above). Under a limit that
# leaves a minute or less before it, a requeue would only restart the job with nothing done.
limit=$(sed -n 's/.*TimeLimit=\([^ ]*\).*/\1/p' <<<"$job_info")
limit_s=$(seconds "$limit")
too_short=
if [[ -n $limit_s ]] && (( limit_s <= 300 + 60 )); then
    too_short="time limit $limit is within a minute of the 5-minute warning"
    say "$too_short: the job will not requeue itself; at its limit it stops, and the same command resumes from the checkpoints"
fi

requeue() {
    if [[ -n $too_short ]]; then
        say "time limit near: not requeueing ($too_short)"
    elif (( ${SLURM_RESTART_COUNT:-0} < max_requeues )); then
        say "time limit near: requeueing job $job; the rerun resumes from the checkpoints"
        scontrol requeue "$job"
    else
        say "time limit near and already requeued ${SLURM_RESTART_COUNT:-0} times (MAX_REQUEUES=$max_requeues): not requeueing again"
    fi
}
trap requeue USR1

# One GPU per worker, none for the scheduler (rank 0) and the client (rank 1). srun gives every task
# all of the node's GPUs (CUDA_VISIBLE_DEVICES=0,1); each task narrows that before Python starts,
# as TensorFlow reads it once. The k-th worker on a node gets its k-th GPU (srun's default block
# distribution puts ranks 0 and 1 on the first node); more workers than GPUs share round robin.
bind_gpu='
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra gpus <<<"$CUDA_VISIBLE_DEVICES"
    first=$(( SLURM_PROCID - SLURM_LOCALID ))
    skip=$(( first < 2 ? 2 - first : 0 ))
    if (( SLURM_PROCID < 2 )); then
        export CUDA_VISIBLE_DEVICES=
    else
        export CUDA_VISIBLE_DEVICES=${gpus[(SLURM_LOCALID - skip) % ${#gpus[@]}]}
    fi
fi
trap "" USR1   # inherited as ignored: a --signal=USR1 meant for the batch shell must not end the run
exec "$@"'

# Bad inputs fail here, in seconds, with one line, before any Dask process starts.
"$python" -m jobs.sweep --check "${args[@]}" || { say "inputs rejected; nothing was started"; exit 2; }

# No --kill-on-bad-exit: a lost worker rank must not end the job (Dask reruns its tasks on the
# others). If the client rank dies, the scheduler shuts down after fine-pruning.runner-idle-timeout
# (jobs/jobqueue.yaml) and the workers follow, so the job does not idle to its time limit.
# --export=ALL: the tasks get this script's environment (the one activated above) even when the
# job was submitted with --export=NONE, which srun would otherwise pass on as no environment at all.
srun --export=ALL bash -c "$bind_gpu" bind-gpu "$python" -m jobs.sweep --slurm-runner "${args[@]}" &
pid=$!
status=0
wait "$pid" || status=$?
while kill -0 "$pid" 2>/dev/null; do   # a trapped signal interrupted wait; srun still runs
    status=0
    wait "$pid" || status=$?
done
say "srun exited with status $status"
exit "$status"
