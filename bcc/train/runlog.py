"""The run log: `metrics.jsonl` rows and progress lines, written on the main process only.

`RunLog.log(row, step)` is the one seam every metric row goes through (trackers plug in here later);
`progress` prints the step line with throughput and ETA. `read_rows` is the reader of metrics.jsonl
(old rows' `acc4`/`bacc4` read as `acc`/`bacc`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path

from bcc.atomic import atomic_write
from bcc.console import console

_OLD_METRIC = re.compile(r"^(b?acc)\d+$")  # acc4, bacc4: combined metrics that once carried the class count


def scalar_metrics(metrics: Mapping) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def migrate_row(row: Mapping) -> dict:
    """A metrics.jsonl row in today's names: `acc4`/`bacc4` -> `acc`/`bacc` (kept where both exist)."""
    out = {}
    for key, value in row.items():
        m = _OLD_METRIC.match(key)
        if m:
            out.setdefault(m.group(1), value)
        else:
            out[key] = value
    return out


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl ([] when absent), older metric names migrated."""
    path = Path(path)
    if not path.is_file():
        return []
    return [migrate_row(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RunLog:
    """Metric rows and progress of one run; silent and file-free on every rank but the main one."""

    def __init__(self, run_dir: Path, is_main: bool, name: str = "") -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.is_main = is_main
        self.name = name
        self.t_start = time.perf_counter()

    def log(self, row: Mapping, step: int) -> None:
        """Append one row (JSON scalars: metric values, split name, ...) at optimizer step `step`."""
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **row}) + "\n")

    def prune(self, last_step: int) -> None:
        """Drop rows of work a resume will redo (after `last_step`; all when -1) and the final test rows."""
        if not self.is_main or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if last_step >= 0 and json.loads(line).get("step", 0) <= last_step
                and json.loads(line).get("split") != "test"]
        if len(keep) != len(lines):
            with atomic_write(self.path) as f:
                f.write("".join(line + "\n" for line in keep))

    def start_clock(self) -> None:
        self.t_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def progress(self, *, epoch: int, epochs: int, batch: int, batches: int, step: int, loss: float, lr: float,
                 rate: float, eta: float) -> None:
        console.print(f"epoch {epoch}/{epochs} batch {batch}/{batches} step {step} loss {loss:.4f} lr {lr:.2e} "
                      f"{rate:.1f} img/s eta {fmt_seconds(eta)}")
