"""A packed dataset's `manifest.json`: the one writer (`write_manifest`, used by `bcc.pack` and the
benchmarks' synthetic shards) beside the one reader (`Manifest.load`, used by every reader).

The writer also writes timm's `_info.json` (read by `timm.data.readers.reader_wds`) from the same data.

Format versions (`"format": "bcc-shards/N"`). Every change to what a pack holds bumps N; the reader
accepts every version up to `FORMAT_VERSION` (a pack from a newer bcc is refused by name), and readers
ask `Manifest.format_version` (or `has_checksums`) instead of guessing from what a sample holds:
  1  the first format: image + `json` per sample, shard sha256 in the manifest.
  2  per sample: `stored_crc32` in the json (CRC-32 of the stored image bytes, checked as the stream
     reads them) and a `cls` entry (leaf class index as ASCII digits, the WebDataset convention read by
     timm's wds reader and `WebDataset(...).to_tuple("jpg", "cls")`); images stored as jpg/png/webp only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bcc.errors import BccError
from bcc.taxonomy import Taxonomy, TaxonomyError

__all__ = ["FORMAT", "FORMAT_VERSION", "Manifest", "ManifestError", "ManifestNotFoundError", "ShardInfo", "SplitInfo",
           "split_entry", "write_manifest"]

FORMAT_NAME = "bcc-shards"
FORMAT_VERSION = 2  # what `write_manifest` writes; see the module docstring for the history
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
CHECKSUM_VERSION = 2  # first version with per-sample `stored_crc32` and `cls`


def parse_format(value: Any) -> int | None:
    """`"bcc-shards/N"` -> N (an int >= 1); None for anything else."""
    if not isinstance(value, str) or not value.startswith(f"{FORMAT_NAME}/"):
        return None
    number = value[len(FORMAT_NAME) + 1:]
    return int(number) if number.isdigit() and int(number) >= 1 else None


class ManifestError(BccError, ValueError):
    """manifest.json is missing, unreadable or not a bcc shard manifest; or a name is unknown."""


class ManifestNotFoundError(ManifestError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class ShardInfo:
    path: Path  # absolute
    count: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    name: str
    count: int
    class_counts: dict[str, int]
    shards: list[ShardInfo]


class Manifest:
    """`Manifest.load(dir)`; then `.taxonomy`, `.classes`, `.splits`, `.split(name)`, `.options`."""

    def __init__(self, root: Path, data: dict[str, Any]):
        self.root = root
        self.data = data
        self.path = root / "manifest.json"
        try:
            self.taxonomy = Taxonomy.from_dict(data["taxonomy"])
        except TaxonomyError as e:
            raise ManifestError(f"{self.path}: invalid taxonomy: {e}") from e
        self._splits = {name: self._parse_split(name, s) for name, s in data["splits"].items()}

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Load `<path>/manifest.json` (or `path` itself when it names the file)."""
        path = Path(path)
        file = path if path.name == "manifest.json" and not path.is_dir() else path / "manifest.json"
        if not file.is_file():
            raise ManifestNotFoundError(f"no manifest at {file} (is {file.parent} a `bcc pack` output?)")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError(f"cannot read {file}: {e}") from e
        except json.JSONDecodeError as e:
            raise ManifestError(f"{file} is not valid JSON: {e}") from e
        version = parse_format(data.get("format")) if isinstance(data, dict) else None
        if version is None:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ManifestError(f"{file} is not a {FORMAT_NAME} manifest (format: {found!r})")
        if version > FORMAT_VERSION:
            raise ManifestError(
                f"{file} is format {FORMAT_NAME}/{version}, written by a newer bcc; this bcc reads up to "
                f"{FORMAT}: upgrade bcc"
            )
        for key in ("taxonomy", "classes", "splits"):
            if key not in data:
                raise ManifestError(f"{file} lacks the key {key!r}")
        try:
            return cls(file.parent.resolve(), data)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"{file} is malformed: {type(e).__name__}: {e}") from e

    def _parse_split(self, name: str, s: dict[str, Any]) -> SplitInfo:
        shards = [ShardInfo((self.root / sh["path"]).resolve(), int(sh["count"]), str(sh["sha256"]))
                  for sh in s["shards"]]
        return SplitInfo(name, int(s["count"]), {str(k): int(v) for k, v in s["class_counts"].items()}, shards)

    @property
    def format_version(self) -> int:
        return parse_format(self.data["format"]) or 0

    @property
    def has_checksums(self) -> bool:
        """True when every sample carries `stored_crc32` (format 2 on); older packs are read unchecked."""
        return self.format_version >= CHECKSUM_VERSION

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.data["classes"])

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._splits)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.data.get("options", {}))

    def split(self, name: str) -> SplitInfo:
        try:
            return self._splits[name]
        except KeyError:
            raise ManifestError(
                f"unknown split {name!r} in {self.path}; available: {', '.join(self._splits) or 'none'}"
            ) from None

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}={s.count}" for n, s in self._splits.items())
        return f"Manifest({str(self.root)!r}, {counts})"


# --------------------------------------------------------------------------- writing


def split_entry(shards: Sequence[Mapping[str, Any]], class_counts: Mapping[str, int]) -> dict[str, Any]:
    """A split's manifest entry from its shards (`{"path": name, "count", "sha256"}`, in order) and
    its per-class counts (every class of the taxonomy, zeros included)."""
    return {"count": sum(int(s["count"]) for s in shards), "class_counts": dict(class_counts),
            "shards": [dict(s) for s in shards]}


def _timm_info(name: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """timm's `_info.json`: per split name, size and shards."""
    splits = {
        k: {"name": k, "num_samples": s["count"], "filenames": [sh["path"] for sh in s["shards"]],
            "shard_lengths": [sh["count"] for sh in s["shards"]]}
        for k, s in manifest["splits"].items()
    }
    classes = manifest["classes"]
    return {"name": name, "num_classes": len(classes), "classes": classes, "splits": splits}


def write_manifest(
    out: str | Path,
    taxonomy: Taxonomy,
    splits: Mapping[str, Mapping[str, Any]],
    *,
    source: str,
    options: Mapping[str, Any] | None = None,
    skipped: Sequence[Mapping[str, str]] = (),
    converted: Sequence[Mapping[str, str]] = (),
    duplicates: Sequence[Mapping[str, Any]] = (),
    warnings: Sequence[str] = (),
    name: str | None = None,
) -> dict[str, Any]:
    """Write `out/manifest.json` and `out/_info.json` atomically; returns the manifest.

    `splits` maps a split name to its `split_entry`; shard paths are relative to `out`. `name` is the
    dataset name in `_info.json` (default: `out`'s name).
    """
    from bcc import __version__
    from bcc.atomic import write_json

    out = Path(out)
    manifest = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bcc_version": __version__,
        "source": source,
        "options": dict(options or {}),
        "taxonomy": taxonomy.to_dict(),
        "classes": list(taxonomy.class_names),
        "splits": {k: dict(v) for k, v in splits.items()},
        "skipped": [dict(s) for s in skipped],
        "converted": [dict(c) for c in converted],
        "duplicates": [dict(d) for d in duplicates],
        "warnings": list(warnings),
    }
    write_json(out / "manifest.json", manifest)
    write_json(out / "_info.json", _timm_info(name or out.name, manifest))
    return manifest
