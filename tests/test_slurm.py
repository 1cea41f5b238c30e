"""The project's own sbatch scripts, submitted to a real Slurm on this machine (slurm/local/start.sh).

Two fake nodes on one host (2 CPUs each on the CI machine, no GPUs, task/affinity binding); jobs train a
tiny timm model on the CPU (ACCELERATE_USE_CPU=true, the explicit opt-in) and override the scripts'
GPU/CPU/memory defaults with LOCAL_RESOURCES. Job states come from `scontrol show job` (there is no
sacct without slurmdbd). Locally these tests skip when Slurm is not
installed; under CI=true that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("BCC_SLURM_DIR", "/tmp/bcc-slurm"))
NODES_UP_TIMEOUT = 300
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

# What the jobs ask for instead of the scripts' #SBATCH defaults (GPUs, 8+ CPUs, 16G+), which the
# local nodes cannot give: no GPU, one fake node's CPUs, memory that is not enforced here.
LOCAL_RESOURCES = {"--gpus-per-node": "0", "--cpus-per-task": "2", "--mem": "1G"}

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def is_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Skip locally; under CI a test that cannot run is a failure."""
    if is_ci():
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def require_slurm() -> None:
    missing = [
        cmd for cmd in ("sbatch", "scontrol", "sinfo", "slurmctld", "slurmd") if shutil.which(cmd) is None
    ]
    if missing:
        skip_or_fail(
            f"Slurm is not installed (missing {', '.join(missing)}); run slurm/local/start.sh as root"
        )


def slurm_env(conf: Path) -> dict[str, str]:
    """This process's environment aimed at the local cluster, without a surrounding job's SLURM_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    return env


def is_cluster_up(conf: Path) -> bool:
    if not conf.exists():  # without a config, clients retry for 60 s
        return False
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"],
            env=slurm_env(conf),
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and len(set(out.stdout.split("\n")) - {""}) >= 2


@pytest.fixture(scope="session")
def slurm_conf():
    """The local cluster's slurm.conf; starts the cluster if it is down and stops it afterwards."""
    require_slurm()
    conf = SLURM_DIR / "slurm.conf"
    started = False
    if not is_cluster_up(conf):
        if os.geteuid() != 0:
            skip_or_fail(f"the local Slurm ({SLURM_DIR}) is not running and starting it needs root")
        env = {**os.environ, "BCC_SLURM_DIR": str(SLURM_DIR)}
        subprocess.run(
            ["bash", str(ROOT / "slurm/local/start.sh")],
            env=env,
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=NODES_UP_TIMEOUT,
        )
        started = True
    yield conf
    if started:
        subprocess.run(
            ["bash", str(ROOT / "slurm/local/stop.sh")],
            env={**os.environ, "BCC_SLURM_DIR": str(SLURM_DIR)},
            stdin=subprocess.DEVNULL,
            timeout=NODES_UP_TIMEOUT,
        )


def job_env(conf: Path, run_root: Path, **extra: str) -> dict[str, str]:
    """Environment for sbatch: the jobs run this interpreter and put run directories under run_root."""
    env = slurm_env(conf)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        BCC_PYTHON=sys.executable,
        BCC_ROOT=str(ROOT),
        BCC_RUN_ROOT=str(run_root),
        ACCELERATE_USE_CPU="true",  # no GPU here: without it launch/train.sh refuses (exit 2)
        **extra,
    )
    return env


def submit(
    script: str,
    *args: str,
    name: str,
    cwd: Path,
    env: dict,
    sbatch_args: tuple[str, ...] = (),
    resources: dict[str, str] | None = None,
) -> str:
    """sbatch one of slurm/*.sbatch from cwd (its %x.out lands there) with LOCAL_RESOURCES updated by
    `resources`; returns the job id."""
    asked = [f"{k}={v}" for k, v in {**LOCAL_RESOURCES, **(resources or {})}.items()]
    out = subprocess.run(
        ["sbatch", "--parsable", "-J", name, *asked, *sbatch_args, str(ROOT / "slurm" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_info(job_id: str, env: dict) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def wait_for_job(job_id: str, env: dict, log: Path, timeout: float) -> dict[str, str]:
    """Poll until the job reaches a final state; on timeout cancel it and fail with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id, env)
        if info["JobState"] in FINISHED:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    pytest.fail(
        f"job {job_id} not finished after {timeout:.0f}s (state {info['JobState']}); log:\n{read_log(log)}"
    )


def wait_until(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen after {timeout:.0f}s; log:\n{read_log(log)}")
        time.sleep(0.2)


def assert_completed(info: dict, log: Path) -> None:
    assert info["JobState"] == "COMPLETED", (
        f"job {info['JobId']}: {info['JobState']} {info['ExitCode']}\n{read_log(log)}"
    )


# --------------------------------------------------------------------------- data and config


def write_images(root: Path, per_class: int = 10, size: int = 32) -> Path:
    """One folder per class of the default taxonomy, small solid-colour JPEGs with a few blocks."""
    from PIL import Image

    for c, folder in enumerate(["Benign", "Early", "Pre", "Pro"]):
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), (60 * c, 20 * i % 256, 128))
            img.paste((255 - 60 * c, 90, 20 * i % 256), (i % 20, c * 4, i % 20 + 8, c * 4 + 8))
            img.save(root / folder / f"img{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def shards(slurm_conf, tmp_path_factory) -> Path:
    """A tiny packed dataset, packed by slurm/pack.sbatch (which this also tests)."""
    work = tmp_path_factory.mktemp("slurm-data")
    src = write_images(work / "images")
    out = work / "shards"
    env = job_env(slurm_conf, work / "runs")
    env.pop("PYTHONPATH", None)  # packing needs the real bcc even when a test run swaps the trainer
    # Two shards: the stream gives each rank x loader worker its own shards.
    job = submit("pack.sbatch", str(src), str(out), "--min-shards", "2", name="pack", cwd=work, env=env)
    info = wait_for_job(job, env, work / "pack.out", timeout=180)
    assert_completed(info, work / "pack.out")
    assert (out / "manifest.json").exists(), read_log(work / "pack.out")
    return out


@pytest.fixture(scope="session")
def train_config(shards, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slurm-config") / "tiny.yaml"
    path.write_text(
        f"data:\n  shards: {shards}\n  image_size: 32\n  batch_size: 4\n  eval_batch_size: 8\n  workers: 1\n"
        "model:\n  backbone: test_resnet\n"
        "train:\n  epochs: 1\n  lr: 0.01\n"
    )
    return path


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(300)
def test_train_sbatch_completes_on_the_cpus_it_asked_for(slurm_conf, train_config, tmp_path):
    env = job_env(slurm_conf, tmp_path / "runs")
    # One CPU of a 2-CPU node: the job record shows 1, and the task is bound to 1.
    job = submit(
        "train.sbatch",
        str(train_config),
        name="train",
        cwd=tmp_path,
        env=env,
        resources={"--cpus-per-task": "1", "--mem": "900M"},
    )
    log = tmp_path / "train.out"
    info = wait_for_job(job, env, log, timeout=240)
    assert_completed(info, log)
    text = read_log(log)
    assert (info["NumCPUs"], info["CPUs/Task"], info["MinMemoryNode"]) == ("1", "1", "900M"), info
    assert "cpus_per_task=1 gpus_per_node=0 mem_per_node=900M" in text, text
    # The launcher's line: the affinity every rank of the task inherits, and one thread per rank.
    launch = next((line for line in text.splitlines() if line.startswith("launch:")), "")
    assert "cpu_affinity=1 " in launch and "OMP_NUM_THREADS=1" in launch, (
        f"expected the task bound to 1 CPU (slurm.conf TaskPlugin=task/affinity; restart the local Slurm "
        f"if it predates that: slurm/local/stop.sh && slurm/local/start.sh)\n{text}"
    )
    run = tmp_path / "runs" / "train"  # keyed by the job name
    assert list((run / "checkpoints").glob("step-*")), text
    assert (run / "metrics.jsonl").stat().st_size > 0


@pytest.mark.timeout(300)
def test_multinode_sbatch_runs_one_machine_rank_per_node(slurm_conf, train_config, tmp_path):
    env = job_env(slurm_conf, tmp_path / "runs")
    job = submit(
        "train_multinode.sbatch",
        str(train_config),
        name="multinode",
        cwd=tmp_path,
        env=env,
        sbatch_args=("--nodes=2",),
    )
    log = tmp_path / "multinode.out"
    assert_completed(wait_for_job(job, env, log, timeout=240), log)
    text = read_log(log)
    # Each node evaluated its own $SLURM_NODEID: rank 0 on the first node, rank 1 on the second.
    launches = dict(re.findall(r"launch: node=(\S+) .*--machine_rank=(\d+)", text))
    assert sorted(launches.values()) == ["0", "1"], text
    assert len(set(launches)) == 2, text
    # One process per node, in one world of 2.
    assert re.search(r"bcc: rank 0/2\b", text) and re.search(r"bcc: rank 1/2\b", text), text
    # Rendezvous: both nodes meet at the allocation's first host, on the port derived from the job id.
    first_host = sorted(launches, key=launches.get)[0]
    rendezvous = set(re.findall(r"--main_process_ip=(\S+) --main_process_port=(\d+)", text))
    assert rendezvous == {(first_host, str(20000 + int(job) % 20000))}, text
    assert list((tmp_path / "runs" / "multinode" / "checkpoints").glob("step-*")), text


@pytest.mark.timeout(120)
def test_gpu_job_without_gpu_or_cpu_opt_in_fails_with_one_error_line(slurm_conf, train_config, tmp_path):
    env = job_env(slurm_conf, tmp_path / "runs")
    del env["ACCELERATE_USE_CPU"]  # the job asks for no GPU and does not choose the CPU either
    env["CUDA_VISIBLE_DEVICES"] = ""  # and sees none, also on a machine that has one
    job = submit("train.sbatch", str(train_config), name="nogpu", cwd=tmp_path, env=env)
    log = tmp_path / "nogpu.out"
    info = wait_for_job(job, env, log, timeout=100)
    text = read_log(log)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no GPU visible" in errors[0] and "SLURM_GPUS_PER_NODE='0'" in errors[0], text
    assert "Traceback" not in text and "bcc: rank" not in text, text
    assert not (tmp_path / "runs" / "nogpu").exists(), text


@pytest.mark.timeout(400)
def test_usr1_checkpoints_requeues_and_resumes_in_the_same_run_dir(slurm_conf, train_config, tmp_path):
    # Two processes, so the signal goes through torchrun and the ranks agree on stopping.
    env = job_env(slurm_conf, tmp_path / "runs", BCC_NUM_PROCESSES="2")
    job = submit("train.sbatch", str(train_config), "train.epochs=3", name="preempt", cwd=tmp_path, env=env)
    log = tmp_path / "preempt.out"
    run = tmp_path / "runs" / "preempt"
    # config.yaml is written once the trainer's signal handlers are in place.
    wait_until(lambda: (run / "config.yaml").exists(), 180, "run.dir/config.yaml", log)
    # What --signal=B:USR1@<seconds> does before the time limit, now.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=30)
    info = wait_for_job(job, env, log, timeout=300)
    assert_completed(info, log)
    text = read_log(log)
    assert info["Restarts"] == "1", text
    assert "SLURM_RESTART_COUNT=1" in text, text
    assert "step exited with 75" in text and "requeueing" in text, text
    assert "preempted" in text and "resumed from" in text, text
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["preempt"]
    assert list((run / "checkpoints").glob("step-*")), text


@pytest.mark.timeout(300)
def test_sweep_sbatch_runs_one_sweep_entry_per_array_task(slurm_conf, train_config, tmp_path):
    sweep = tmp_path / "lr.txt"
    sweep.write_text("# one line per task\ntrain.lr=0.01\n\ntrain.lr=0.02\n")
    env = job_env(slurm_conf, tmp_path / "runs")
    job = submit(
        "sweep.sbatch",
        str(train_config),
        str(sweep),
        name="sweep",
        cwd=tmp_path,
        env=env,
        sbatch_args=("--array=0-1",),
    )
    for task, lr in enumerate(["0.01", "0.02"]):
        log = tmp_path / f"sweep-{task}.out"
        assert_completed(wait_for_job(f"{job}_{task}", env, log, timeout=240), log)
        assert f"sweep entry {task}: train.lr={lr}" in read_log(log)
        assert list((tmp_path / "runs" / f"sweep-{task}" / "checkpoints").glob("step-*")), read_log(log)


@pytest.mark.timeout(400)
def test_compare_sbatch_trains_one_planned_run_per_array_task_then_aggregates(slurm_conf, train_config, tmp_path):
    # bcc compare --seeds 2 as an array job: task N trains line N of `bcc compare --plan`; task 2 has no
    # run (one clear line, exit 2); the dependent --aggregate job predicts each run's test split and
    # writes the table over both seeds
    env = job_env(slurm_conf, tmp_path / "runs")
    opts = ("--modes", "full", "--seeds", "2")
    job = submit("compare.sbatch", *opts, str(train_config), name="cmp", cwd=tmp_path, env=env,
                 sbatch_args=("--array=0-2",))
    agg_log = tmp_path / "cmp-aggregate.out"
    agg = submit("compare.sbatch", *opts, "--aggregate", name="cmp", cwd=tmp_path, env=env,
                 sbatch_args=(f"--dependency=afterany:{job}", "-o", str(agg_log)))
    out = tmp_path / "runs" / "cmp"
    for task in (0, 1):
        log = tmp_path / f"cmp-{task}.out"
        assert_completed(wait_for_job(f"{job}_{task}", env, log, timeout=240), log)
        assert f"run {task} -> {out}/full/seed-{task}: finetune.preset=full" in read_log(log)
        assert f"train.seed={task}" in read_log(log)
        assert (out / "full" / f"seed-{task}" / "summary.json").is_file(), read_log(log)
    log = tmp_path / "cmp-2.out"
    assert wait_for_job(f"{job}_2", env, log, timeout=60)["ExitCode"].startswith("2:")
    assert "the comparison has 2 runs (array tasks 0-1); no run 2" in read_log(log)
    assert_completed(wait_for_job(agg, env, agg_log, timeout=120), agg_log)
    results = (out / "RESULTS.md").read_text()
    assert "| full |" in results and "| 2 |" in results and "[" in results, results  # 2 seeds, intervals
    assert all((out / "full" / f"seed-{s}" / "test_predictions.csv").is_file() for s in (0, 1))
