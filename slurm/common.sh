# shellcheck shell=bash
# Sourced by slurm/*.sbatch: the bash they share. It builds command lines and handles signals;
# there is no training logic here.
#
# Env read here: BCC_ROOT (the bcc checkout, default: the directory sbatch was run from),
# BCC_RUN_ROOT (parent of the run directories, default runs).

BCC_ROOT=${BCC_ROOT:-$SLURM_SUBMIT_DIR}
export BCC_ROOT
# Log lines from the trainer reach %x.out as they happen.
export PYTHONUNBUFFERED=1

# "Beginning with 22.05, srun will not inherit the --cpus-per-task value requested by salloc or
# sbatch" (sbatch(1)): without this a step's task may get 1 CPU of the job's many.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

# Exit code of a trainer that saved a checkpoint because it was asked to stop (EX_TEMPFAIL).
BCC_EXIT_PREEMPTED=75

bcc_log() { echo "[bcc $(date '+%F %T')] $*"; }

# One line naming the job; a requeued job shows SLURM_RESTART_COUNT=1, 2, ...
bcc_log_job() {
    bcc_log "job=$SLURM_JOB_ID name=$SLURM_JOB_NAME SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}" \
        "nodes=$SLURM_JOB_NODELIST${SLURM_ARRAY_TASK_ID:+ array_task=$SLURM_ARRAY_TASK_ID}" \
        "cpus_per_task=${SLURM_CPUS_PER_TASK:-?} gpus_per_node=${SLURM_GPUS_PER_NODE:-0}" \
        "mem_per_node=${SLURM_MEM_PER_NODE:-?}M"
}

# bcc_with_run_defaults RUN_NAME CONFIG [key=value ...]
# Sets BCC_ARGS to CONFIG and the overrides plus run.dir=$BCC_RUN_ROOT/RUN_NAME and
# checkpoint.resume=auto, each only when not given: the run directory is keyed by the job name, so
# a requeued job resumes where it stopped.
bcc_with_run_defaults() {
    local name=$1 arg has_dir=0 has_resume=0
    shift
    BCC_ARGS=("$@")
    for arg in "${@:2}"; do
        [[ $arg == run.dir=* ]] && has_dir=1
        [[ $arg == checkpoint.resume=* ]] && has_resume=1
    done
    ((has_dir)) || BCC_ARGS+=("run.dir=${BCC_RUN_ROOT:-runs}/$name")
    ((has_resume)) || BCC_ARGS+=(checkpoint.resume=auto)
    return 0
}

# Trap handler: ask the job step to save and stop. srun forwards USR1 to every process of the step
# and launch/accelerate_launch.py keeps waiting while the trainer saves. The step always gets USR1,
# also when this shell got TERM: srun answers its own TERM by SIGKILLing the tasks ("forcing job
# termination"), and the trainer treats USR1 and TERM alike.
bcc_forward_signal() {
    BCC_INTERRUPTED=1
    BCC_SIGNAL=$1
    bcc_log "got SIG$1; sending SIGUSR1 to the job step"
    if [[ -n ${BCC_STEP_PID:-} ]]; then
        kill -s USR1 "$BCC_STEP_PID" 2>/dev/null || true
    fi
}

# bcc_run_step COMMAND ...   (COMMAND is an srun)
# Runs the step in the background (bash runs traps only between commands, so a foreground srun
# would hold USR1 until it ends), passes USR1/TERM on to it, and waits for it. Exits the script:
# on 75 after USR1 or with no signal, the job is requeued (resuming in the same run directory) and
# the script exits 0; otherwise it exits with the step's code. After TERM there is no requeue:
# TERM means scancel, the time limit or preemption, and Slurm decides the job's fate then.
bcc_run_step() {
    local rc
    BCC_SIGNAL=
    BCC_STEP_PID=
    trap 'bcc_forward_signal USR1' USR1
    trap 'bcc_forward_signal TERM' TERM
    "$@" &
    BCC_STEP_PID=$!
    while :; do
        BCC_INTERRUPTED=0
        wait "$BCC_STEP_PID" && rc=0 || rc=$?
        # A trap interrupts wait (status > 128) while the step is still running: wait again.
        ((BCC_INTERRUPTED && rc > 128)) || break
    done
    BCC_STEP_PID=
    # The traps stay: a signal arriving now must not kill this shell (it would exit 138 and fail
    # the job); bcc_forward_signal then only logs it.
    bcc_log "step exited with $rc"
    if ((rc == BCC_EXIT_PREEMPTED)) && [[ $BCC_SIGNAL != TERM ]]; then
        bcc_log "checkpoint saved; requeueing job $SLURM_JOB_ID"
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            bcc_log "scontrol requeue failed (was the job submitted with --no-requeue?)"
            exit "$rc"
        fi
        exit 0
    fi
    exit "$rc"
}
