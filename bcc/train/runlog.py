"""The run log: `metrics.jsonl` rows, experiment trackers and the progress view, on the main process only.

`RunLog.log(row, step)` is the one seam every metric row goes through: metrics.jsonl, and the trackers of
`run.report_to` (bcc/trackers.py) through the Accelerator. `progress` shows the step's loss, lr,
throughput and ETA: on a terminal as a live rich progress bar per epoch (`begin_epoch`/`end_epoch`),
elsewhere (Slurm logs, CI, pipes) as one plain line per log step. `read_rows` is the reader of
metrics.jsonl (old rows' `acc4`/`bacc4` read as `acc`/`bacc`). `RunLog.save_notes` keeps the `note:` and
`warning:` lines of each start in `notes.json`, read by `read_notes`.
"""

from __future__ import annotations

import atexit
import json
import re
import time
from collections.abc import Mapping
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bcc.atomic import atomic_write, set_aside, write_json
from bcc.console import console, warn
from bcc.errors import BccError
from bcc.trackers import tracker_values

_OLD_METRIC = re.compile(r"^(b?acc)\d+$")  # acc4, bacc4: combined metrics that once carried the class count


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its children (loader workers, live or ended)
    since it started: what a run costs on shared CPUs, where wall time depends on the load."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:  # ended meanwhile: then counted in children_* of its parent
            pass
    return total


def scalar_metrics(metrics: Mapping) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def canonical_metric(name: str) -> str:
    """`acc4` -> `acc`, `bacc4` -> `bacc`: a metric's name without the class count older runs carried."""
    m = _OLD_METRIC.match(name)
    return m.group(1) if m else name


def migrate_row(row: Mapping) -> dict:
    """A metrics row (metrics.jsonl, an evaluation's metrics.json) in today's names: `acc4`/`bacc4` ->
    `acc`/`bacc`; where a row has both, today's name keeps its value."""
    out = {}
    for key, value in row.items():
        name = canonical_metric(key)
        if name == key:
            out[key] = value
        else:
            out.setdefault(name, value)
    return out


class RunLogError(BccError):
    """A metrics.jsonl that cannot be read, naming the file and line."""


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl ([] when absent), older metric names migrated: the one reader (compare,
    report and the model card read through it). A line that is not a JSON object is a RunLogError naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RunLogError(f"cannot read {path}: {e}") from e
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunLogError(f"{path} line {n} is not JSON: {e}") from None
        if not isinstance(row, dict):
            raise RunLogError(f"{path} line {n} is not a JSON object")
        rows.append(migrate_row(row))
    return rows


NOTES_FILE = "notes.json"


def read_notes(run_dir: str | Path) -> list[dict]:
    """The starts recorded in a run's notes.json, oldest first: [{"step": int, "time": str, "notes": [line,
    ...]}] ([] when absent). Anything else (not JSON, not a file, a step that is no count) is a RunLogError
    naming the file and what is wrong."""
    path = Path(run_dir) / NOTES_FILE
    if not path.exists() and not path.is_symlink():
        return []
    try:
        starts = json.loads(path.read_text(encoding="utf-8"))["starts"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise RunLogError(f"cannot read {path}: {e}") from None
    if not isinstance(starts, list):
        raise RunLogError(f"cannot read {path}: 'starts' is not a list")
    for n, start in enumerate(starts):
        step = start.get("step") if isinstance(start, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise RunLogError(f"cannot read {path}: start {n} has no step count (step: {json.dumps(step)})")
        if not isinstance(start.get("notes"), list) or not all(isinstance(x, str) for x in start["notes"]):
            raise RunLogError(f"cannot read {path}: start {n} has no list of lines under 'notes'")
    return starts


def fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RunLog:
    """Metric rows and progress of one run; silent and file-free on every rank but the main one.

    `accelerator`: the run's Accelerator, whose trackers (`run.report_to`, started on the main process)
    receive every row. `live`: draw the rich progress bar (default: on the main process when stdout is
    an interactive terminal).
    """

    def __init__(self, run_dir: Path, is_main: bool, name: str = "", accelerator=None,
                 live: bool | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.is_main = is_main
        self.name = name
        self.accelerator = accelerator
        self.live = is_main and is_terminal() if live is None else live
        self.stage: int | None = None
        self._view: Progress | None = None
        self.t_start = time.perf_counter()

    def log(self, row: Mapping, step: int) -> None:
        """Append one row (JSON scalars: metric values, split name, ...) at optimizer step `step`;
        the trackers get its numbers as `SPLIT/NAME` at the same step."""
        if self.is_main:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"step": step, **row}) + "\n")
            except OSError as e:  # a failed write (a full disk) names no file: name it
                if e.filename is not None or e.errno is None:
                    raise
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            self._track(tracker_values(row), step)

    def save_notes(self, lines: list[str], step: int, fresh: bool) -> None:
        """Record this start's `note:`/`warning:` lines (source overlap, pretrained overlap, workers, an old
        pack, a refused resume candidate...) in notes.json, atomically: one entry per start of the run
        (`step`: the optimizer step it starts from), a fresh start's replacing the file's earlier ones."""
        if not self.is_main:
            return
        earlier = self._readable_notes()  # also at a fresh start: a damaged file is kept, not overwritten
        starts = [] if fresh else [s for s in earlier if s["step"] <= step]
        starts.append({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": list(lines)})
        write_json(self.path.parent / NOTES_FILE, {"starts": starts})

    def _readable_notes(self) -> list[dict]:
        """notes.json's starts; a damaged one (notes are a record, not the run's state) is renamed aside with a
        warning, which this start's notes then hold, and a new notes.json begins."""
        try:
            return read_notes(self.path.parent)
        except RunLogError as e:
            aside = set_aside(self.path.parent / NOTES_FILE)  # OSError: cannot rename, as any write there
            warn(f"{e}; kept as {aside.name}, and {NOTES_FILE} begins again with this start's notes")
            return []

    def _track(self, values: Mapping, step: int) -> None:
        if self.accelerator is not None and self.accelerator.trackers:  # trackers exist on the main process only
            self.accelerator.log(dict(values), step=step)

    def prune(self, last_step: int) -> None:
        """Drop rows of work a resume will redo (after `last_step`; all when -1) and the final test rows."""
        if not self.is_main or not self.path.exists():
            return
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if n < len(lines):
                    raise RunLogError(f"{self.path} line {n} is not JSON: the run log is damaged") from None
                # the last row's write was cut (kill -9 mid-line): its work is redone by the resume
                warn(f"{self.path}: dropped its last line, cut short while written: {line[:60]!r}")
                rows.append(None)
        keep = [line for line, row in zip(lines, rows, strict=True) if row is not None and last_step >= 0
                and row.get("step", 0) <= last_step and row.get("split") != "test"]
        if len(keep) != len(lines):
            with atomic_write(self.path) as f:
                f.write("".join(line + "\n" for line in keep))

    def start_clock(self) -> None:
        self.t_start = time.perf_counter()
        self.cpu_start = process_cpu_seconds()

    def cpu_elapsed(self) -> float:
        """CPU seconds of this process tree since `start_clock` (one run's, also when several runs
        train one after another in one process, as `bcc compare --processes 1` does)."""
        return process_cpu_seconds() - getattr(self, "cpu_start", 0.0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def begin_epoch(self, *, epoch: int, epochs: int, batches: int, done: int = 0, stage: int | None = None) -> None:
        """An epoch (1-based) starts, `done` of its `batches` already behind it (a mid-epoch resume)."""
        self.stage = stage
        if not self.live:
            return
        self.end_epoch()
        self._view = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            TextColumn("stage {task.fields[stage]}"),
            BarColumn(),
            TextColumn("batch {task.completed:.0f}/{task.total:.0f}"),
            TextColumn("step {task.fields[step]} loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} "
                       "{task.fields[rate]:.1f} img/s"),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            console=console,
        )
        self._view.add_task("train", total=batches, completed=done, epoch=epoch, epochs=epochs,
                            stage="-" if stage is None else stage, step="-", loss=float("nan"), lr=0.0, rate=0.0,
                            eta="-:--:--")
        self._view.start()
        atexit.register(self.end_epoch)  # an error mid-epoch must not leave the terminal's cursor hidden

    def end_epoch(self) -> None:
        """Leave the epoch's finished bar on the terminal (plain mode: nothing to do)."""
        if self._view is not None:
            self._view.stop()
            atexit.unregister(self.end_epoch)
            self._view = None

    def progress(self, *, epoch: int, epochs: int, batch: int, batches: int, step: int, loss: float, lr: float,
                 rate: float, eta: float) -> None:
        """One log step: the trackers get `train/loss`, `train/lr`, `train/img_per_s`, `train/epoch`
        (fractional); the terminal's bar moves, or a plain line is printed."""
        if not self.is_main:
            return
        self._track({"train/loss": loss, "train/lr": lr, "train/img_per_s": rate,
                     "train/epoch": epoch - 1 + batch / max(batches, 1)}, step)
        if self._view is not None:
            task = self._view.tasks[0]
            self._view.update(task.id, completed=batch, total=batches, epoch=epoch, epochs=epochs, step=step,
                              loss=loss, lr=lr, rate=rate, eta=fmt_seconds(eta))
            return
        console.print(f"epoch {epoch}/{epochs} batch {batch}/{batches} step {step} loss {loss:.4f} lr {lr:.2e} "
                      f"{rate:.1f} img/s eta {fmt_seconds(eta)}")


def is_terminal() -> bool:
    """Whether the program's console is an interactive terminal (not a Slurm log, a pipe or CI: FORCE_COLOR
    makes rich treat those as terminals, so the file itself must be a tty too)."""
    try:
        return bool(console.is_interactive and console.file.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stdout
        return False
