"""The manifest's per-file lists (`skipped`, `converted`, `duplicates`, `near_duplicates`): written inline
or, when they name many paths, streamed to a side file beside manifest.json that the manifest names with
its count and sha256 (format 4); read back from either form, the side file checked against that hash.

`bcc.manifest` owns the format (which lists there are, the inline limit `LIST_INLINE`, the versions) and
calls these; nothing else should.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from bcc import remote

__all__ = ["read_list", "write_list"]


def _list_size(entry: Mapping[str, Any]) -> int:
    """Paths an entry of a per-file list names: its `paths` (a duplicate set, a near-duplicate group), or one."""
    return len(entry["paths"]) if isinstance(entry.get("paths"), list) else 1


def write_list(out: Path, name: str, entries: Collection[Mapping[str, Any]], inline: int) -> list | dict:
    """A per-file list: inline when it names at most `inline` paths, else streamed to `<name>.jsonl`
    (atomically, hashed as it is written, one entry at a time: a lazy `entries` is never held whole) and named
    by the manifest. Paths, not entries, are counted: 500,000 copies of one image are one entry."""
    from bcc.atomic import atomic_write

    if len(entries) <= inline:  # few entries: held anyway, to count their paths
        listed = [dict(e) for e in entries]
        if sum(map(_list_size, listed)) <= inline:
            return listed
        entries = listed
    file = f"{name}.jsonl"
    h, n = hashlib.sha256(), 0
    with atomic_write(out / file, "wb") as f:
        for e in entries:
            line = (json.dumps(dict(e)) + "\n").encode("utf-8")
            h.update(line)
            f.write(line)
            n += 1
    return {"file": file, "count": n, "sha256": h.hexdigest()}


def read_list(root: Path | str, shown: str, name: str, value: Any) -> list[dict[str, Any]]:
    """The entries of the list `name` whose manifest value is `value` (a list, or a side file's
    `{"file", "count", "sha256"}` beside the manifest at `root`, shown in messages as `shown`).
    Raises ManifestError naming the side file when it is unreadable, not beside the manifest, or its
    hash or count disagree."""
    from bcc.manifest import ManifestError  # here: bcc.manifest imports this module

    if not isinstance(value, dict):
        return list(value)
    file = str(value.get("file", ""))
    if "/" in file or not remote.is_plain_name(file):  # a name beside manifest.json, nothing else
        raise ManifestError(f"{shown}: {name} names the side file {file!r}, not a file beside the manifest")
    location = remote.join(root, file)
    where = remote.display(location)
    try:
        raw = remote.read_bytes(location)
    except (OSError, remote.RemoteError) as e:
        raise ManifestError(f"cannot read {where} (the manifest's {name}): {getattr(e, 'strerror', None) or e}"
                            ) from e
    want = value.get("sha256")
    if want is not None and hashlib.sha256(raw).hexdigest() != want:
        raise ManifestError(f"{where} does not match the sha256 in {shown}: damaged or replaced")
    try:
        text = raw.decode("utf-8")
        entries = ([json.loads(line) for line in text.splitlines() if line.strip()] if file.endswith(".jsonl")
                   else json.loads(text))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON: {e}") from e
    if "count" in value and len(entries) != value["count"]:
        raise ManifestError(f"{where} holds {len(entries)} entries but {shown} says {value['count']}")
    return entries
