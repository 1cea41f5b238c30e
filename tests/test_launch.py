"""launch/: a GPU launch without a GPU refuses (one `error:` line, exit 2); the CPU is an explicit choice.

The GPU is hidden with CUDA_VISIBLE_DEVICES="", so these hold on a GPU machine too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LAUNCHER = REPO / "launch" / "accelerate_launch.py"


def no_gpu_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_", "OMP_"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env["BCC_PYTHON"] = sys.executable
    env.update(extra)
    return env


def run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_refused(out: subprocess.CompletedProcess) -> None:
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr
    assert len(errors) == 1 and "no GPU visible" in errors[0] and "ACCELERATE_USE_CPU=true" in errors[0], (
        out.stderr
    )
    assert "Traceback" not in out.stderr and "bcc: rank" not in out.stdout


def test_gpu_launch_without_gpu_refuses(tmp_path):
    out = run(
        [sys.executable, str(LAUNCHER), "--config_file", str(REPO / "launch/1gpu.yaml"), "-m", "bcc", "runtime"],
        no_gpu_env(),
        tmp_path,
    )
    assert_refused(out)
    assert "CUDA_VISIBLE_DEVICES=''" in out.stderr


def test_train_sh_without_cpu_opt_in_refuses_instead_of_training_on_cpu(tmp_path):
    # Slurm said 2 GPUs, torch sees none: the launcher must not pick a CPU config by itself.
    out = run(
        ["bash", str(REPO / "launch/train.sh"), "missing.yaml"], no_gpu_env(SLURM_GPUS_ON_NODE="2"), tmp_path
    )
    assert_refused(out)
    assert "SLURM_GPUS_ON_NODE='2'" in out.stderr


def test_cpu_opt_in_launches_with_threads_from_the_slurm_cpus(tmp_path):
    # ACCELERATE_USE_CPU=true with a GPU config file: the environment is the opt-in.
    env = no_gpu_env(ACCELERATE_USE_CPU="true", SLURM_CPUS_PER_TASK="6", OMP_NUM_THREADS="3")
    out = run(
        [sys.executable, str(LAUNCHER), "--config_file", str(REPO / "launch/1gpu.yaml"), "-m", "bcc", "runtime"],
        env,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "cpu_affinity=" in out.stdout and "OMP_NUM_THREADS=3" in out.stdout, out.stdout

    # launch/train.sh on the CPU: OMP_NUM_THREADS = SLURM_CPUS_PER_TASK / processes, NCCL error
    # handling on; the trainer then stops on the missing config (a config error, not a GPU one).
    env = no_gpu_env(ACCELERATE_USE_CPU="true", SLURM_CPUS_PER_TASK="6", BCC_NUM_PROCESSES="1")
    out = run(["bash", str(REPO / "launch/train.sh"), "missing.yaml"], env, tmp_path)
    launch_line = next(line for line in out.stderr.splitlines() if line.startswith("launch:"))
    assert "gpus=0" in launch_line and "OMP_NUM_THREADS=6" in launch_line and "cpu.yaml" in launch_line
    assert out.returncode == 2 and "no GPU" not in out.stderr, out.stderr


def test_missing_accelerate_config_is_one_error_line(tmp_path):
    out = run(
        [sys.executable, str(LAUNCHER), "--config_file", "nope.yaml", "-m", "bcc", "runtime"],
        no_gpu_env(),
        tmp_path,
    )
    assert out.returncode == 2 and out.stderr.strip() == "error: accelerate config file nope.yaml not found"


def test_bcc_launch_of_two_ranks_keeps_their_error_line_and_exit_code_without_a_traceback(tmp_path):
    # plain `accelerate launch` exits 1 and prints torch elastic's ChildFailedError traceback under the
    # ranks' `error:` lines; `bcc launch` (also what bcc demo / compare / cv launch with) exits 2
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  shards: {tmp_path / 'nowhere'}\nmodel:\n  backbone: test_resnet\n")
    out = run([sys.executable, "-m", "bcc", "launch", "--multi_gpu", "--num_processes", "2", "-m", "bcc.train",
               "--config", str(cfg)], no_gpu_env(ACCELERATE_USE_CPU="true"), tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr
    # the same error on every rank from the same inputs: rank 0 prints it, once for the job
    assert len(errors) == 1 and str(tmp_path / "nowhere") in errors[0], out.stderr
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr, out.stderr
    assert "torch/distributed/elastic" not in out.stderr, out.stderr  # its W/E lines: see the next test


RANKS = """import os, sys, time
if os.environ["RANK"] == "0":
    if sys.argv[1] == "1":
        raise RuntimeError("a bug on rank 0")
    sys.stderr.write("error: rank 0 stops\\n")
    sys.exit(int(sys.argv[1]))
time.sleep(120)  # ended by the launcher once rank 0 has exited
"""


def test_bcc_launch_keeps_to_bccs_own_lines_unless_a_rank_crashed(tmp_path):
    """When a rank exits with 2 (its `error:` line) or 75 (preempted), torch elastic's `W... Sending process
    N closing signal SIGTERM` and `E... failed (exitcode: 75)` followed bcc's lines; they are left out. A
    rank that crashed on a bug keeps its traceback and torch elastic's line naming its exit code."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    for code in (2, 75, 1):
        out = run([sys.executable, "-m", "bcc", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                   "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(code)],
                  no_gpu_env(ACCELERATE_USE_CPU="true"), tmp_path)
        assert out.returncode == code, out.stderr
        assert "Sending process" not in out.stderr, out.stderr
        if code == 1:
            assert "RuntimeError: a bug on rank 0" in out.stderr and "failed (exitcode: 1)" in out.stderr, out.stderr
        else:
            assert out.stderr.strip() == "error: rank 0 stops", out.stderr


def test_ranks_end_with_a_killed_launcher(synth_shards, tmp_path):
    """SIGKILL of the launcher (the OOM killer, `kill -9`, a scheduler without cgroups) left both ranks
    training on their own, in the sessions torch elastic starts them in, writing checkpoints into a run
    dir a requeued run would use too: a rank started by a launcher now ends with it (PR_SET_PDEATHSIG)."""
    import contextlib
    import signal
    import time

    import psutil

    from bcc.launch import accelerate_command

    from conftest import write_config

    if not sys.platform.startswith("linux"):
        import pytest

        pytest.skip("parent-death signals are Linux's")
    cfg = write_config(tmp_path / "cfg.yaml", synth_shards, tmp_path / "run", train={"epochs": 500})
    cmd, env = accelerate_command(2, ["--config", str(cfg)])
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ranks: list = []
    try:
        deadline = time.monotonic() + 120
        while len(ranks) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            ranks = [p for p in psutil.Process(proc.pid).children() if "bcc.train" in " ".join(p.cmdline())]
        assert len(ranks) == 2, "the two ranks did not start"
        while not list((tmp_path / "run").glob("metrics.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.5)  # training, not still importing
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group: the ranks are in sessions of their own
        proc.wait()
        alive = ranks
        deadline = time.monotonic() + 20
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"ranks {[p.pid for p in alive]} outlived their launcher"
    finally:  # whatever happened, no rank (or its loader workers) outlives the test
        for p in ranks:
            with contextlib.suppress(psutil.Error):
                for q in [*p.children(recursive=True), p]:
                    q.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
