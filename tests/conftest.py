"""Shared test fixtures: tiny synthetic images written with PIL (no dependency on bcc.synth)."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import pytest


def image_bytes(seed: int, size: int = 32, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small random-coloured image (blocks of colour, so JPEG stays tiny) encoded as `fmt`."""
    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):
        x, y = rng.randrange(size), rng.randrange(size)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(size, x + 8), min(size, y + 8)))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def make_class_tree():
    """Factory: write `{folder: n_images}` random JPEGs (size px) under root; returns root."""

    def make(root: Path, counts: dict[str, int], size: int = 32, seed: int = 0, fmt: str = "JPEG") -> Path:
        ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
        for f, (folder, n) in enumerate(counts.items()):
            (root / folder).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                data = image_bytes(seed * 1_000_003 + f * 10_007 + i, size, fmt)
                (root / folder / f"img{i:04d}.{ext}").write_bytes(data)
        return root

    return make


# --------------------------------------------------------------------------- synthetic packed data

REPO = Path(__file__).resolve().parents[1]
TINY_BACKBONE = "test_resnet"  # timm's ~0.4M-parameter ResNet: fast enough to train in tests


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A synthetic blood-smear folder (4 classes x 60 images, 48 px) shared by the session."""
    from bcc.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, per_class=60, size=48, seed=0)
    return root


@pytest.fixture(scope="session")
def synth_shards(synth_data, tmp_path_factory) -> Path:
    """`synth_data` packed 70/15/15 into at least 4 shards per split."""
    from bcc.pack import pack_folders

    out = tmp_path_factory.mktemp("packed") / "shards"
    pack_folders(synth_data, out, split=(0.7, 0.15, 0.15), seed=0, min_shards=4)
    return out


def write_config(path: Path, shards: Path, run_dir: Path, **sections) -> Path:
    """A tiny CPU training config: test backbone, 32 px, one worker; `sections` override keys."""
    import yaml

    cfg = {
        "data": {"shards": str(shards), "image_size": 32, "batch_size": 16, "eval_batch_size": 32, "workers": 1},
        "model": {"backbone": TINY_BACKBONE},
        "train": {"epochs": 2, "lr": 0.05, "log_every": 5, "warmup_steps": 2},
        "run": {"dir": str(run_dir)},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def bcc_in_process(*args) -> int:
    """`bcc ARGS` run in this process (`bcc.cli.main`, which is all `python -m bcc` runs); returns the exit
    code. It saves a new interpreter importing torch, timm and accelerate again (seconds a call), so use it
    for commands that end early (an `error:` line) or only load a checkpoint (eval, predict, export,
    report); training runs stay subprocesses. A bug (not a BccError) raises here instead of printing its
    traceback, so it fails the test all the same. Accelerate's process-wide state is emptied for the call
    and put back after it, and so are the SIGUSR1/SIGTERM handlers a training run installs
    (`bcc.train.preempt`): the call sees a fresh process and leaves the test process as it found it."""
    import signal

    from accelerate.state import AcceleratorState, GradientState

    from bcc.cli import main

    saved = [(state, dict(state._shared_state)) for state in (AcceleratorState, GradientState)]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    for state, _ in saved:
        state._shared_state.clear()
    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse refusing an argument
        return e.code
    finally:
        for state, values in saved:
            state._shared_state.clear()
            state._shared_state.update(values)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.fixture
def bcc_main(capsys):
    """`bcc_in_process` with its output: returns (returncode, stdout, stderr) like `subprocess.run`."""
    from types import SimpleNamespace

    def run(*args):
        capsys.readouterr()
        rc = bcc_in_process(*args)
        out = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)

    return run


def run_bounded(cmd, timeout: float, env=None, **kwargs):
    """`subprocess.run(cmd, capture_output=True, text=True)` in a new session; past `timeout` seconds the
    WHOLE process tree is killed (subprocess.run kills only the child: accelerate's ranks would linger and
    load every later test) and the test fails with the tail of what it printed, so a hang says where."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} still ran after {timeout:.0f} s; it printed:\n"
                    f"{out[-4000:]}\n--- stderr ---\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextlib.contextmanager
def launched(config: Path, *overrides: str, processes: int = 2):
    """`accelerate launch -m bcc.train` of real multi-process CPU DDP in the background, for a test that acts
    on its ranks meanwhile (`trainer_ranks`, `wait_until`): yields the Popen (new session; stdout and stderr
    merged into `proc.stdout`, text). On leaving, a launch still running is killed with its whole tree."""
    import os
    import signal
    import subprocess

    from bcc.launch import accelerate_command

    cmd, env = accelerate_command(processes, ["--config", str(config), *overrides])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def wait_until(condition, proc, what: str, timeout: float = 300) -> None:
    """Poll `condition()` until it holds; fail with the tail of `proc`'s output if `proc` ends first, or
    naming `what` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)


def trainer_ranks(pid: int) -> dict:
    """Trainer rank -> psutil.Process among the children of an `accelerate launch` process `pid` (the ranks;
    not their loader workers, which share their command line and RANK)."""
    import psutil

    return {int(c.environ().get("RANK", -1)): c for c in psutil.Process(pid).children()
            if "bcc.train" in " ".join(c.cmdline())}


def launch(config: Path, *overrides: str, processes: int = 2, timeout: float = 300):
    """Run `accelerate launch -m bcc.train` with real multi-process CPU DDP; returns the CompletedProcess."""
    from bcc.launch import accelerate_command

    cmd, env = accelerate_command(processes, ["--config", str(config), *overrides])
    return run_bounded(cmd, timeout, env=env)


@pytest.fixture(scope="session")
def ddp_run(synth_shards, tmp_path_factory):
    """One real 2-process CPU DDP run (`accelerate launch`) shared by the tests that check what such a run
    writes: 2 epochs, test at the end, eval.calibrate and an operating point fitted on val from every
    rank's logits, and TensorBoard + MLflow reporting. Returns (run dir, the launch's CompletedProcess).
    Read it, don't change it (copy the run dir first)."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir = root / "ddp"
    cfg = write_config(root / "cfg.yaml", synth_shards, run_dir,
                       eval={"calibrate": True, "operating_point": "sensitivity>=0.9"},
                       run={"report_to": ["tensorboard", "mlflow"]})
    proc = launch(cfg, processes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc
