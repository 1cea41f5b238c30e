#!/usr/bin/env bash
# Start a real single-host Slurm with two fake nodes, for the test suite and for trying the sbatch
# scripts locally. Needs root (it may apt-get install slurm and munge, and runs the daemons as root).
#
#   slurm/local/start.sh            # idempotent: a running cluster is left as it is
#   source /tmp/bcc-slurm/env       # sets SLURM_CONF for sbatch/squeue/scontrol
#   slurm/local/stop.sh
#
# Everything (slurm.conf, state, spool, logs, pid files, the munge socket) lives in BCC_SLURM_DIR
# (default /tmp/bcc-slurm). Nodes: <host> and <host>-2, both 127.0.0.1, partition "debug".
# Env: BCC_SLURM_DIR, BCC_SLURM_PORT (slurmctld port; the slurmds use the next two, default 6817),
# BCC_SLURM_WAIT (seconds to wait for the nodes to become idle, default 60).
set -euo pipefail

DIR=${BCC_SLURM_DIR:-/tmp/bcc-slurm}
PORT=${BCC_SLURM_PORT:-6817}
WAIT=${BCC_SLURM_WAIT:-60}
HOST=$(hostname -s)
NODES=("$HOST" "$HOST-2")

log() { echo "slurm-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

# True when the pid file names a live process.
is_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Start a daemon in its own session with no inherited fds, so callers (CI, pytest) never wait on it.
spawn() {
    local out=$1; shift
    setsid "$@" </dev/null >>"$out" 2>&1 &
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [[ $(id -u) == 0 ]] || die "slurm is not installed and installing it needs root"
    log "installing slurm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y --no-install-recommends \
                slurmctld slurmd slurm-client munge >/dev/null; } \
        || die "apt-get install of slurm failed"
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    cat >"$DIR/slurm.conf.tmp" <<EOF
# Written by slurm/local/start.sh; two fake nodes on one host.
ClusterName=bcc-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: otherwise a requeued job waits ~120 s before it may start again.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
# task/affinity binds each task to the CPUs it was given, as on a real cluster (the tests check the
# affinity count a job gets).
TaskPlugin=task/affinity
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Look at pending jobs every second: a requeued job becomes eligible ~cred_expire s later, and with
# the default intervals (60 s main loop, 30 s backfill) it waits for the next pass, up to a minute.
SchedulerParameters=bf_interval=1,sched_interval=1
# Keep finished jobs visible to squeue/scontrol (there is no sacct without slurmdbd).
MinJobAge=3600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=${NODES[0]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Rewrite only on change, so a running cluster never sees its config move under it.
    if cmp -s "$DIR/slurm.conf.tmp" "$DIR/slurm.conf"; then
        rm "$DIR/slurm.conf.tmp"
    else
        mv "$DIR/slurm.conf.tmp" "$DIR/slurm.conf"
    fi
    echo "export SLURM_CONF=$DIR/slurm.conf" >"$DIR/env"
}

start_munge() {
    local m=$DIR/munge
    is_alive "$m/munged.pid" && return
    # munged refuses to run as root and insists on directories only it can write.
    install -d -o munge -g munge -m 0755 "$m"
    spawn "$DIR/log/munged.out" runuser -u munge -- /usr/sbin/munged \
        --socket="$m/munge.socket" --pid-file="$m/munged.pid" \
        --log-file="$m/munged.log" --seed-file="$m/munged.seed"
    for _ in $(seq 50); do
        [[ -S $m/munge.socket ]] && return
        sleep 0.1
    done
    die "munged did not start; see $m/munged.log and $DIR/log/munged.out"
}

start_daemons() {
    if ! is_alive "$DIR/run/slurmctld.pid"; then
        spawn "$DIR/log/slurmctld.out" slurmctld -f "$DIR/slurm.conf"
    fi
    local node
    for node in "${NODES[@]}"; do
        if ! is_alive "$DIR/run/slurmd-$node.pid"; then
            spawn "$DIR/log/slurmd-$node.out" slurmd -f "$DIR/slurm.conf" -N "$node"
        fi
    done
}

# True when sinfo lists both nodes, each idle (or running jobs: a cluster in use is up too).
is_up() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    local node
    for node in "${NODES[@]}"; do
        grep -Eq "^$node (idle|mix|alloc)$" <<<"$states" || return 1
    done
}

wait_up() {
    local deadline=$((SECONDS + WAIT))
    until is_up; do
        if ((SECONDS >= deadline)); then
            log "nodes not idle after ${WAIT}s:"
            sinfo -N -o '%N %t %E' >&2 || true
            die "see the logs in $DIR/log"
        fi
        sleep 0.2
    done
}

main() {
    install_packages
    mkdir -p "$DIR"/{state,run,log}
    write_conf
    export SLURM_CONF=$DIR/slurm.conf
    if is_alive "$DIR/run/slurmctld.pid" && is_up; then
        log "already running ($DIR)"
        return
    fi
    start_munge
    start_daemons
    wait_up
    log "up: nodes ${NODES[*]}; run: source $DIR/env"
}

main "$@"
