"""Atomic file writes: the one helper every writer of a finished file uses.

A reader (another rank, a launcher, a user's script, the next run after a kill -9) sees either the
old file or the complete new one, never half of it: the content goes to a temporary sibling in the
same directory (same file system, so `os.replace` is atomic), is flushed and fsynced, then renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def tmp_sibling(path: Path) -> Path:
    """A temporary name beside `path` (matched by `.gitignore`'s `*.tmp-*`), unique per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` (permissions `mode`).

    For writers that want a path rather than a file object (safetensors, torch.save, matplotlib).
    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        yield tmp
        replace_durably(tmp, path, mode)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a failed write() (a full disk) names no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike, mode: int = 0o644) -> None:
    """`atomic_path`'s commit on its own: `tmp` (complete, beside `path`) gets permissions `mode`, is
    fsynced and renamed to `path`. For a file written elsewhere than where it is committed (a pool
    worker writes a shard, the packer's thread makes it durable while the next ones are written)."""
    os.chmod(tmp, mode)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """`with atomic_write(p) as f: f.write(...)`: `open(p, mode)` that replaces `p` only when complete.

    `mode` is "w" (text; pass `newline=""` for csv) or "wb". Raises whatever `open`/`write` raise
    (e.g. `OSError` ENOSPC); `path` is then unchanged.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """Write `data` as JSON (UTF-8, trailing newline) atomically."""
    with atomic_write(path, encoding="utf-8") as f:
        f.write(json.dumps(data, indent=indent) + "\n")


def read_json_object(path: str | os.PathLike) -> dict[str, Any] | None:
    """`write_json`'s reader for a small JSON object file beside a checkpoint or run (operating_point.json,
    temperature.json): None when `path` does not exist; ValueError naming `path` for a file that cannot be
    read, is not JSON, or holds something other than an object (callers turn it into their own error)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object, found {type(data).__name__}")
    return data


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged `path` (a file or a directory) to `NAME.damaged-TIME` beside it, kept for a look,
    so that a new one can be written in its place. Returns the new name."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for n in range(1000):
        aside = path.with_name(f"{path.name}.damaged-{stamp}" + (f"-{n}" if n else ""))
        if not aside.exists() and not aside.is_symlink():
            os.rename(path, aside)  # a directory too (the name is free)
            return aside
    raise FileExistsError(f"cannot set {path} aside: {path.name}.damaged-{stamp}-N are all taken")
