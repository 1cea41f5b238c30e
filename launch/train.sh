#!/usr/bin/env bash
# Launch bcc.train with an accelerate config that fits this machine.
#
#   launch/train.sh [--ACCELERATE_OPTION=VALUE ...] CONFIG [key=value ...]
#
# Picks the accelerate config (unless BCC_LAUNCH_CONFIG or --config_file=... is given):
#   ACCELERATE_USE_CPU=true:  launch/cpu.yaml, or launch/cpu_2proc.yaml when BCC_NUM_PROCESSES > 1
#   1 GPU:   launch/1gpu.yaml
#   N GPUs:  launch/1node_multigpu.yaml --num_processes=N
# GPUs are counted from SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`. Training
# on the CPU is opt-in: without ACCELERATE_USE_CPU=true this is a GPU launch, and one that finds no GPU
# stops with an `error:` line and exit 2 (launch/accelerate_launch.py) instead of training on the CPU.
# Each rank gets OMP_NUM_THREADS = CPUs of this task (SLURM_CPUS_PER_TASK, else the affinity count) /
# processes per machine, unless it is set; TORCH_NCCL_ASYNC_ERROR_HANDLING=1 unless set.
# BCC_NUM_PROCESSES sets the processes per machine. Options before CONFIG (in --name=value form) go
# to accelerate launch; with --num_machines=M the default --num_processes is M x processes per machine.
# Runs launch/accelerate_launch.py (accelerate launch that keeps the trainer's exit code) with
# BCC_PYTHON (default: python on PATH).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

accelerate_args=()
while [[ $# -gt 0 && $1 == --* ]]; do
    accelerate_args+=("$1")
    shift
done
if [[ $# -lt 1 ]]; then
    echo "usage: launch/train.sh [--ACCELERATE_OPTION=VALUE ...] CONFIG [key=value ...]" >&2
    exit 2
fi
config=$1
shift

# The value of --name=VALUE among the accelerate options, or empty.
option() {
    local arg
    for arg in "${accelerate_args[@]}"; do
        [[ $arg == "--$1="* ]] && echo "${arg#*=}"
    done
    return 0
}

count_gpus() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true
    elif command -v nvidia-smi >/dev/null; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# accelerate's own reading of ACCELERATE_USE_CPU (str_to_bool)
use_cpu=0
case ${ACCELERATE_USE_CPU:-} in
    [yY] | [yY][eE][sS] | [tT] | [tT][rR][uU][eE] | [oO][nN] | 1) use_cpu=1 ;;
esac

gpus=$( ((use_cpu)) && echo 0 || count_gpus)
per_machine=${BCC_NUM_PROCESSES:-$((gpus > 0 ? gpus : 1))}
machines=$(option num_machines)
machines=${machines:-1}
py=${BCC_PYTHON:-python}

# Intra-op threads per rank from the CPUs this task was given. accelerate passes OMP_NUM_THREADS to
# every rank; unset, it gives GPU ranks 1 thread and a CPU launch the whole machine's cores.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$("$py" -m bcc runtime --threads-per-process "$per_machine")}
export OMP_NUM_THREADS
# A NCCL collective that fails or times out tears the process down (and the job with it) instead of
# leaving the rank hanging; the name since torch 2.2 (torchrun's agent defaults it to 1 as well).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

config_file=$(option config_file)
if [[ -z $config_file ]]; then
    if [[ -n ${BCC_LAUNCH_CONFIG:-} ]]; then
        config_file=$BCC_LAUNCH_CONFIG
    elif ((machines > 1)); then
        config_file=$here/multinode.yaml
    elif ((use_cpu)); then
        config_file=$here/$( ((per_machine > 1)) && echo cpu_2proc.yaml || echo cpu.yaml)
    elif ((per_machine == 1)); then
        config_file=$here/1gpu.yaml
    else
        config_file=$here/1node_multigpu.yaml
    fi
    accelerate_args=(--config_file="$config_file" "${accelerate_args[@]}")
fi
if [[ -z $(option num_processes) ]]; then
    accelerate_args+=(--num_processes="$((per_machine * machines))")
fi

cmd=("$py" "$here/accelerate_launch.py" "${accelerate_args[@]}" -m bcc.train --config "$config" "$@")
echo "launch: node=${SLURMD_NODENAME:-$(hostname -s)} gpus=$gpus $("$py" -m bcc runtime) ${cmd[*]}" >&2
exec "${cmd[@]}"
