"""`bcc pack --verify`: every shard of a packed dataset re-hashed against its manifest (its sha256, and its
`head_sha256` where the manifest has one: what training checks when it opens the shard) and recounted, and
its `sample_index.npz` checked (`check_index`: there, readable, and written for these shards).

A remote shard (an http(s) URL or a `pipe:` command) is read once through `bcc.remote`, as training reads
it, into a temporary file and checked there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcc import remote
from bcc.shards import HEAD_BYTES, ShardError, count_tar_samples, damaged_samples, file_digests

__all__ = ["ShardCheck", "VerifyResult", "check_index", "repeated_shards", "verify_shards"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def repeated_shards(placed: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any, str, Any]]:
    """(where, shard, where first, that shard) for each shard of `placed` ((where, ShardInfo) pairs) whose
    sha256 was listed before: the same bytes twice (a test shard listed in train too). Digests compare in
    any case; a placeholder digest (not 64 hex digits: a hand-made manifest), a fold view (its shards
    are shared by design) and an empty shard name no shard and are left out."""
    first: dict[str, tuple[str, Any]] = {}
    for where, shard in placed:
        digest = shard.sha256.lower()
        if shard.folds is not None or shard.count == 0 or not _SHA256.fullmatch(digest):
            continue
        if digest in first:
            yield where, shard, *first[digest]
        else:
            first[digest] = (where, shard)


@dataclass(frozen=True)
class ShardCheck:
    path: Path | str  # a remote shard: its URL or pipe: command (bcc.remote)
    status: str  # "ok", "mismatch", "missing", "extra" or "listed twice" (one shard in two places); "none": no index
    detail: str = ""


@dataclass(frozen=True)
class VerifyResult:
    out: Path
    shards: list[ShardCheck] = field(default_factory=list)
    index: ShardCheck | None = None  # the sample index (`check_index`)

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.shards) and (self.index is None or self.index.status in ("ok", "none"))

    @property
    def mismatches(self) -> list[ShardCheck]:
        return [s for s in self.shards if s.status != "ok"]


def _check_remote(shard, has_checksums: bool) -> ShardCheck:
    """`_check` of a URL or `pipe:` shard: read once through `bcc.remote` into a temporary file."""
    import dataclasses
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bcc-verify-") as tmp:
        local = Path(tmp) / "shard.tar"
        try:
            stream = remote.open_location(shard.path)
            try:
                with open(local, "wb") as f:
                    shutil.copyfileobj(stream, f, 1 << 20)
            finally:
                stream.close()
        except remote.RemoteError as e:
            return ShardCheck(shard.path, "missing", str(e))
        return dataclasses.replace(_check(dataclasses.replace(shard, path=local), has_checksums), path=shard.path)


def _check(shard, has_checksums: bool) -> ShardCheck:
    if not isinstance(shard.path, Path):
        return _check_remote(shard, has_checksums)
    if not shard.path.is_file():
        return ShardCheck(shard.path, "missing", "listed in manifest.json but not on disk")
    digest, head = file_digests(shard.path)
    want_head = (shard.head_sha256 or head).lower()  # none recorded (format < 6): nothing to compare
    head_detail = f"head_sha256 {head[:12]}… != manifest {want_head[:12]}…" if head != want_head else ""
    if digest != shard.sha256.lower():  # a digest in upper case names the same bytes
        shown = 12 if digest[:12] != shard.sha256[:12].lower() else 64  # whole, where the starts agree
        detail = f"sha256 {digest[:shown]}… != manifest {shard.sha256[:shown]}…"
        if head_detail:
            detail += f", {head_detail} (its first {HEAD_BYTES // 1024} KiB differ too)"
        damaged = damaged_samples(shard.path) if has_checksums else []
        if damaged:
            more = f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else ""
            detail += "; damaged: " + "; ".join(damaged[:3]) + more
        return ShardCheck(shard.path, "mismatch", detail)
    if head_detail:  # the shard is the packed one, its fingerprint in the manifest is not: training refuses it
        return ShardCheck(shard.path, "mismatch", f"{head_detail} (the manifest's head fingerprint is wrong: "
                                                  "edited by hand? training refuses this shard)")
    try:
        count = count_tar_samples(shard.path)
    except ShardError as e:
        return ShardCheck(shard.path, "mismatch", str(e))
    except OSError as e:
        return ShardCheck(shard.path, "mismatch", f"unreadable tar: {e}")
    if count != shard.count:
        return ShardCheck(shard.path, "mismatch", f"{count} samples, manifest says {shard.count}")
    return ShardCheck(shard.path, "ok")


def check_index(manifest) -> ShardCheck:
    """The `sample_index.npz` beside `manifest` (`bcc.sample_index.load`): "ok"; "mismatch" when it is
    damaged or cannot be read, was lost (missing beside a manifest of format
    `bcc.sample_index.INDEXED_SINCE` or later, whose packs always have one), or describes splits with
    other shards than the manifest lists (copied from another pack, or the manifest edited since): the
    overlap checks would go without it; "none" for a pack of an older format without one (a note)."""
    from bcc import sample_index

    location = remote.join(manifest.root, sample_index.FILE)
    try:
        index = sample_index.load(manifest)
    except sample_index.SampleIndexError as e:
        return ShardCheck(location, "mismatch", str(e))
    if isinstance(index, str):
        return ShardCheck(location, "none", index)
    if index.stale:
        return ShardCheck(location, "mismatch", f"describes split(s) {', '.join(index.stale)} with other shards than "
                                                "the manifest lists")
    return ShardCheck(location, "ok")


def verify_shards(out: str | Path, key: str = "--verify") -> VerifyResult:
    """Re-hash every shard of a packed dataset against its manifest and recount its samples; check its
    sample index (`check_index`). `key`: where the user wrote `out`, named by a ManifestError about the
    location itself."""
    from bcc.manifest import Manifest

    manifest = Manifest.load(out, key=key)
    placed = [(f"split '{name}' {remote.display(shard.path)}", shard) for name in manifest.splits
              for shard in manifest.split(name).shards]
    again = {id(shard): first for _, shard, first, _ in repeated_shards(placed)}
    checks: list[ShardCheck] = []
    listed: set[str] = set()
    for _, shard in placed:
        listed.add(shard.path.name if isinstance(shard.path, Path) else "")
        checks.append(ShardCheck(shard.path, "listed twice", f"the same sha256 as {again[id(shard)]}")
                      if id(shard) in again else _check(shard, manifest.has_checksums))
    for path in [] if manifest.is_remote else sorted(manifest.root.glob("*.tar")):  # a URL lists no folder
        if path.name not in listed:
            checks.append(ShardCheck(path.resolve(), "extra", "not listed in manifest.json"))
    return VerifyResult(manifest.root, checks, check_index(manifest))
