#!/usr/bin/env bash
# Stop the local Slurm started by slurm/local/start.sh: cancel every job, wait for the jobs to end
# (slurmd leaves running jobs alive when it stops), then stop the daemons by their pid files.
# Env: BCC_SLURM_DIR (default /tmp/bcc-slurm), BCC_SLURM_WAIT (seconds per wait, default 60).
set -euo pipefail

DIR=${BCC_SLURM_DIR:-/tmp/bcc-slurm}
WAIT=${BCC_SLURM_WAIT:-60}
export SLURM_CONF=$DIR/slurm.conf

log() { echo "slurm-local: $*" >&2; }

is_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Send TERM to the daemons named by the pid files (all at once) and wait for them to exit.
stop_daemons() {
    local pidfile pids=() pid deadline
    for pidfile in "$@"; do
        is_alive "$pidfile" || continue
        pid=$(cat "$pidfile")
        kill -TERM "$pid" && pids+=("$pid")
    done
    deadline=$((SECONDS + WAIT))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= deadline)); then
                log "pid $pid ignored TERM for ${WAIT}s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
}

cancel_jobs() {
    is_alive "$DIR/run/slurmctld.pid" || return 0
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || scancel --quiet --user="$(id -un)" || true
    local deadline=$((SECONDS + WAIT))
    # Pending, running and completing jobs all count: slurmd must see their steps end first.
    while [[ -n $(squeue -h -t PD,R,CG,CF,S,RQ,RS,SE -o %i 2>/dev/null) ]]; do
        if ((SECONDS >= deadline)); then
            log "jobs still listed after ${WAIT}s; stopping the daemons anyway"
            squeue -t all >&2 || true
            break
        fi
        sleep 0.5
    done
}

main() {
    if [[ ! -d $DIR ]]; then
        log "nothing to stop ($DIR does not exist)"
        return
    fi
    cancel_jobs
    stop_daemons "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"
    stop_daemons "$DIR/munge/munged.pid"
    log "stopped ($DIR)"
}

main "$@"
