"""bcc.runtime: the CPUs a process may use and the threads each rank gets from them."""

from __future__ import annotations

import os

import pytest

from bcc import runtime


def test_affinity_count_is_the_scheduler_affinity_not_the_machine():
    assert runtime.cpu_affinity_count() == len(os.sched_getaffinity(0))


def test_cpus_given_prefers_slurm_and_falls_back_to_affinity(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")
    assert runtime.cpus_given() == 12
    for bad in ("", "0", "x"):
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", bad)
        assert runtime.cpus_given() == runtime.cpu_affinity_count()
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert runtime.cpus_given() == runtime.cpu_affinity_count()


@pytest.mark.parametrize(
    ("cpus", "processes", "threads"),
    [(64, 8, 8), (64, 1, 64), (12, 8, 1), (8, 3, 2), (1, 4, 1), (16, 0, 16)],
)
def test_threads_per_process_shares_the_cpus_and_never_drops_below_one(cpus, processes, threads):
    assert runtime.threads_per_process(processes, cpus) == threads


def test_cli_prints_the_thread_count_and_the_report(monkeypatch, bcc_main):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    out = bcc_main("runtime", "--threads-per-process", "2")
    assert out.returncode == 0 and out.stdout == "3\n"
    out = bcc_main("runtime")
    assert out.returncode == 0 and out.stdout.startswith(
        f"cpu_affinity={runtime.cpu_affinity_count()} SLURM_CPUS_PER_TASK=6 OMP_NUM_THREADS=3"
    )
    for bad in (["--bogus"], ["--threads-per-process", "0"], ["--threads-per-process", "x"]):
        out = bcc_main("runtime", *bad)
        assert out.returncode == 2 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr
