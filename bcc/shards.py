"""The shard files of a packed dataset: writing a tar reproducibly, sizing, hashing and verifying.

Shards are plain WebDataset tars (`{key}.{ext}` + `{key}.json` per sample). Tar headers carry fixed
mtime and owner, so the same samples give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import math
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ShardCheck", "VerifyResult", "sha256_file", "shard_sizes", "verify_shards", "write_shard"]

# Fixed tar header fields so that the same inputs and seed give byte-identical shards.
_TAR_MTIME = 0
_TAR_USER = "bcc"


def shard_sizes(n: int, shard_size: int, min_shards: int) -> list[int]:
    """Balanced shard sizes: <= shard_size each, at least min_shards when n allows, differ by <= 1."""
    if n == 0:
        return []
    k = max(math.ceil(n / shard_size), min(min_shards, n))
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file at `path`, read in 1 MiB blocks (shards, pretrained weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> None:
    """Write WebDataset samples (`__key__` plus raw bytes per extension) as the tar `path`.

    Not atomic on its own: the packer writes into a temporary directory renamed as a whole.
    """
    import webdataset as wds

    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=_TAR_MTIME, user=_TAR_USER, group=_TAR_USER)
        try:
            for s in samples:
                writer.write(s)
        finally:
            writer.close()


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class ShardCheck:
    path: Path
    status: str  # "ok", "mismatch", "missing" or "extra"
    detail: str = ""


@dataclass(frozen=True)
class VerifyResult:
    out: Path
    shards: list[ShardCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.shards)

    @property
    def mismatches(self) -> list[ShardCheck]:
        return [s for s in self.shards if s.status != "ok"]


def _count_tar_samples(path: Path) -> int:
    keys = set()
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if member.isfile():
                base = member.name.rsplit("/", 1)[-1]
                keys.add(member.name[: len(member.name) - len(base)] + base.split(".", 1)[0])
    return len(keys)


def _check(shard) -> ShardCheck:
    if not shard.path.is_file():
        return ShardCheck(shard.path, "missing", "listed in manifest.json but not on disk")
    digest = sha256_file(shard.path)
    if digest != shard.sha256:
        return ShardCheck(shard.path, "mismatch", f"sha256 {digest[:12]}… != manifest {shard.sha256[:12]}…")
    try:
        count = _count_tar_samples(shard.path)
    except (tarfile.TarError, OSError) as e:
        return ShardCheck(shard.path, "mismatch", f"unreadable tar: {e}")
    if count != shard.count:
        return ShardCheck(shard.path, "mismatch", f"{count} samples, manifest says {shard.count}")
    return ShardCheck(shard.path, "ok")


def verify_shards(out: str | Path) -> VerifyResult:
    """Re-hash every shard of a packed dataset against its manifest and recount its samples."""
    from bcc.manifest import Manifest

    manifest = Manifest.load(out)
    checks: list[ShardCheck] = []
    listed: set[str] = set()
    for split_name in manifest.splits:
        for shard in manifest.split(split_name).shards:
            listed.add(shard.path.name)
            checks.append(_check(shard))
    for path in sorted(manifest.root.glob("*.tar")):
        if path.name not in listed:
            checks.append(ShardCheck(path.resolve(), "extra", "not listed in manifest.json"))
    return VerifyResult(manifest.root, checks)
