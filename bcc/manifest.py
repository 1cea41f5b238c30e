"""A packed dataset's `manifest.json`: the one writer (`write_manifest`, used by `bcc.pack` and the
benchmarks' synthetic shards; it also writes timm's `_info.json`, read by `timm.data.readers.reader_wds`)
beside the one reader (`Manifest.load`, used by every reader).

Format versions (`"format": "bcc-shards/N"`). Every change to what a pack holds bumps N; the reader
accepts every version up to `FORMAT_VERSION` (a pack from a newer bcc is refused by name), and readers
ask `Manifest.format_version` (or `has_checksums`) instead of guessing from what a sample holds:
  1  the first format: image + `json` per sample, shard sha256 in the manifest.
  2  per sample: `stored_crc32` in the json (CRC-32 of the stored image bytes, checked as the stream
     reads them) and a `cls` entry (leaf class index as ASCII digits, the WebDataset convention read by
     timm's wds reader and `WebDataset(...).to_tuple("jpg", "cls")`); images stored as jpg/png/webp only.
  3  near-duplicate groups (`near_duplicates`, or the side file `near_duplicates.json` when large;
     `phash` per sample) and k-fold cross-validation (`bcc pack --folds K`: `folds` in the manifest,
     `fold_counts` per train/val shard, `fold` in each train/val sample's json). Readers of versions
     1-2 see neither and train on the pack's own train/val split.
  4  the per-file lists (`skipped`, `converted`, `duplicates`, `near_duplicates`) naming more than
     `LIST_INLINE` paths (each path of a duplicate set or group counts) live in side files (`<list>.jsonl`, one entry per line) that the manifest
     names with their count and sha256 (`{"file", "count", "sha256"}`); `Manifest.file_list` reads
     either form and checks the hash. A million-image pack keeps a small manifest.json.
  5  per shard: `bytes`, the shard file's size, so the preflight finds a truncated (or replaced)
     shard exactly from one `os.stat` (or a remote shard's HEAD) before the first step; versions 1-4
     keep the lower bound of `MIN_BYTES_PER_SAMPLE` per sample (`bcc.train.preflight`).
  6  per shard: `head_sha256`, the sha256 of the shard's first min(bytes, `bcc.shards.HEAD_BYTES`) bytes
     (64 KiB), taken as the packer writes them. The stream checks it each time it opens a shard, before
     any sample of it (`bcc.shards.read_range`): a shard replaced behind the manifest (another pack's,
     another seed's, two swapped: sizes often agree, tar pads them) is a named error, not silently other
     images. Versions 1-5 (and entries without it, e.g. hand-made) are read unchecked, as before.

Where a pack lives (`bcc.remote`): `Manifest.load` takes a local folder, the http(s) URL of a folder or
of its manifest.json, or a `pipe:` template with `{name}`; shard entries resolve against it. An entry
may also be an absolute URL, a brace list (`train-{000000..000127}.tar`: one entry for many shards,
`count` then one value for every shard or a list with one per shard, `sha256` a list with one per shard), or a
`pipe:` command -- refused unless the caller allows it (`data.allow_pipe_in_manifest`): a manifest
must not be able to run commands the user did not write.

Optional parts (additive; a reader that does not know them ignores them):
- `near_duplicates`: groups of near-identical images kept on one side (`bcc.neardup`), a list of
  `{"paths", "max_distance", "split"}` (or a side file, as the other lists; format 3 wrote
  `{"file": "near_duplicates.json", "count": n}`, a JSON list without a hash, still read).
- `folds` (`bcc pack --folds K`): `{"k", "seed", "splits": ["train", "val"], "counts": [n per fold],
  "class_counts": [{class: n} per fold]}`; each train/val shard entry then has `fold_counts` (samples
  per fold) and each of its samples' json a `fold`. `Manifest.with_fold(k)` is the view that trains
  on the other folds and validates on fold k, sized from these counts without reading a shard.
- Beside the manifest, not in it: `sample_index.npz`, each split's samples' identities (`bcc.sample_index`);
  bcc pack began writing it in format 5, so every pack of format 6 on has one
  (`bcc.sample_index.INDEXED_SINCE`: one missing there was lost, an error).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bcc import remote
from bcc.errors import BccError
from bcc.manifest_lists import read_list, write_list
from bcc.taxonomy import Taxonomy, TaxonomyError

__all__ = ["FORMAT", "FORMAT_VERSION", "FoldError", "Manifest", "ManifestError", "ManifestNotFoundError",
           "FILE_LISTS", "LIST_INLINE", "ShardInfo", "SplitInfo", "split_entry", "write_manifest"]

FORMAT_NAME = "bcc-shards"
FORMAT_VERSION = 6  # what `write_manifest` writes; see the module docstring for the history
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
CHECKSUM_VERSION = 2  # first version with per-sample `stored_crc32` and `cls`
# per-file lists of the manifest; one naming more than LIST_INLINE paths goes to the side file <name>.jsonl
FILE_LISTS = ("skipped", "converted", "duplicates", "near_duplicates")
LIST_INLINE = 1000


def parse_format(value: Any) -> int | None:
    """`"bcc-shards/N"` -> N (an int >= 1); None for anything else."""
    if not isinstance(value, str) or not value.startswith(f"{FORMAT_NAME}/"):
        return None
    number = value[len(FORMAT_NAME) + 1:]
    return int(number) if number.isdigit() and int(number) >= 1 else None



def _whole(value: Any) -> bool:  # a JSON integer in [0, 2**53] (not a bool, float or digit string): what bcc writes
    return type(value) is int and 0 <= value <= 2**53

class ManifestError(BccError, ValueError):
    """manifest.json is missing, unreadable or not a bcc shard manifest; or a name is unknown."""


class ManifestNotFoundError(ManifestError, FileNotFoundError):
    shared = "node"  # every rank of a machine looks at the same path


class FoldError(ManifestError):
    """`data.fold` asked of a pack without folds, or a fold out of range."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path | str  # a local shard: an absolute Path; a remote one: its URL or `pipe:` command (bcc.remote)
    count: int  # samples the readers take from it (only those of `folds` when that is set)
    sha256: str
    fold_counts: tuple[int, ...] | None = None  # samples per cross-validation fold, if packed with folds
    folds: frozenset[int] | None = None  # a fold view: readers keep only samples whose json `fold` is in it
    bytes: int | None = None  # the shard file's size (format 5); None in older packs
    head_sha256: str | None = None  # sha256 of its first min(bytes, 64 KiB) (format 6); None: unchecked
    split: str = ""  # the pack's split that lists it (named by errors)

    def is_kept(self, meta: Mapping[str, Any]) -> bool:
        """Whether a sample (its decoded json) belongs to this shard's view."""
        return self.folds is None or meta.get("fold") in self.folds


@dataclass(frozen=True)
class SplitInfo:
    name: str
    count: int
    class_counts: dict[str, int]
    shards: list[ShardInfo]


class Manifest:
    """`Manifest.load(dir)`; then `.taxonomy`, `.classes`, `.splits`, `.split(name)`, `.options`."""

    fold: int | None = None  # the validation fold of a `with_fold` view

    def __init__(self, root: Path | str, data: dict[str, Any], *, allow_pipe: bool = False):
        self.root = root  # a local pack's resolved folder, or a remote pack's location (str)
        self.data = data
        self.allow_pipe = allow_pipe
        self.path = remote.join(root, "manifest.json") if isinstance(root, str) else root / "manifest.json"
        try:
            self.taxonomy = Taxonomy.from_dict(data["taxonomy"])
        except TaxonomyError as e:
            raise ManifestError(f"{self.shown}: invalid taxonomy: {e}") from e
        self._splits = {name: self._parse_split(name, s) for name, s in data["splits"].items()}

    @property
    def shown(self) -> str:
        """The manifest's location as messages show it (credentials redacted)."""
        return remote.display(self.path)

    @property
    def is_remote(self) -> bool:
        return isinstance(self.root, str)

    @classmethod
    def load(cls, path: str | Path, *, allow_pipe: bool = False, retries: int = remote.DEFAULT_RETRIES,
             key: str = "data.shards", timeout_s: float = remote.HTTP_TIMEOUT_S) -> Manifest:
        """Load `<path>/manifest.json` (or `path` itself when it names the file). `path` may be remote
        (an http(s) URL or a `pipe:` template, see the module docstring): the manifest is fetched, with up
        to `retries` re-tries after a transient error (a read silent for `timeout_s`). `allow_pipe`: honour `pipe:` shard entries. `key`:
        where the user wrote `path` (`--data`, `--verify`), named by errors about the location itself."""
        if isinstance(path, str) and "${" in path and remote.is_local(path):  # a local folder from the environment
            try:
                path = remote.expand_env(path, remember=False)
            except remote.RemoteError as e:
                raise ManifestError(str(e)) from None
        if not remote.is_local(path):
            return cls._load_remote(str(path), allow_pipe, retries, key, timeout_s)
        try:
            remote.check_scheme(path, key)  # s3://..., htps://...: not a local folder
        except remote.RemoteError as e:
            raise ManifestError(str(e)) from None
        if isinstance(path, str) and "{" in path:
            try:
                remote.manifest_location(path, key)  # a brace list names shards, not a dataset: the same message as a URL's
            except remote.RemoteError as e:
                raise ManifestError(str(e)) from None
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
        return cls._from_data(file, file.parent.resolve(), data, allow_pipe)

    @classmethod
    def _load_remote(cls, location: str, allow_pipe: bool, retries: int, key: str, timeout_s: float) -> Manifest:
        try:
            remote.check_no_secrets(location, key)
            root, file = remote.manifest_location(location, key)
        except remote.RemoteError as e:
            raise ManifestError(str(e)) from None
        try:
            raw = remote.read_bytes(file, retries, timeout_s=timeout_s)
        except remote.RemoteError as e:
            raise ManifestError(f"{key}: cannot fetch the manifest {e}") from None  # which source, of several
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{remote.display(file)} is not valid JSON ({e}); it begins {remote.quote_bytes(raw)}") from None
        return cls._from_data(remote.display(file), root, data, allow_pipe)

    @classmethod
    def _from_data(cls, file: Path | str, root: Path | str, data: Any, allow_pipe: bool) -> Manifest:
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
            return cls(root, data, allow_pipe=allow_pipe)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"{file} is malformed: {type(e).__name__}: {e}") from e

    def _parse_split(self, name: str, s: dict[str, Any]) -> SplitInfo:
        shards = []
        local_root = None if self.is_remote else str(self.root)
        for sh in s["shards"]:
            entry = sh["path"]
            folds = sh.get("fold_counts")
            if (local_root is not None and "{" not in entry and ":" not in entry and isinstance(sh.get("sha256"), str)
                    and _whole(sh.get("count")) and _whole(sh.get("bytes", 0)) and isinstance(sh.get("head_sha256", ""), str)
                    and (folds is None or isinstance(folds, list) and all(map(_whole, folds)))):
                # the common case, fast; lexical: `root` is resolved, resolving 100,000 paths would stat each
                shards.append(ShardInfo(Path(os.path.normpath(os.path.join(local_root, entry))), sh["count"],
                                        sh["sha256"], tuple(folds) if folds is not None else None,
                                        bytes=sh.get("bytes"), head_sha256=sh.get("head_sha256") or None, split=name))
                continue
            shards += self._parse_entry(name, sh)  # names the entry and the field that is wrong
        return SplitInfo(name, int(s["count"]), {str(k): int(v) for k, v in s["class_counts"].items()}, shards)

    def _check_name(self, split: str, name: str, entry: str) -> None:
        """Refuse a shard name (an entry, or one name of its brace list) that runs a command, reads the
        environment, would carry the token to another host, or (fetched) names a local file."""
        shown = remote.redact(entry) if name == entry else f"{remote.redact(entry)} (its name {remote.redact(name)})"
        where = f"{self.shown}: split '{split}': the shard entry {shown!r}"
        if name != name.strip() or any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise ManifestError(f"{where} has leading or trailing blanks or control characters; a shard entry is "
                                "a relative file name, an http(s) URL or (where allowed) a pipe: command")
        if name[:5].lower() == "pipe:" and not name.startswith("pipe:"):  # PIPE:..., Pipe:...: a URL join
            raise ManifestError(f"{where} spells pipe: in another case; a manifest may not run commands "  # lowercases
                                "(and a pipe: entry is written pipe:)")  # the scheme: it would have run as pipe:
        if name.startswith("pipe:") and not self.allow_pipe:
            raise ManifestError(f"{where} is a pipe: command; a manifest may not run commands. If you wrote this "
                                "manifest and trust it, set data.allow_pipe_in_manifest=true (or put the command in "
                                "data.shards)")
        if "${" in name:  # expanded when opened: a manifest would send any variable to a host of its choice
            raise ManifestError(f"{where} names an environment variable; a manifest may not read the "
                                "environment (put ${VAR} in data.shards)")
        if remote.sends_token_elsewhere(name, self.root):
            raise ManifestError(f"{where} is on another host than the dataset, which would receive "
                                f"${remote.TOKEN_ENV}; set {remote.TOKEN_HOSTS_ENV} to the hosts that may "
                                "(comma-separated)")
        if self.is_remote and name != entry and (name.startswith(("/", "\\")) or os.path.isabs(name)):
            raise ManifestError(f"{where} is not a URL or a relative name: a fetched manifest may not name "
                                "local files")

    def _parse_entry(self, split: str, sh: dict[str, Any]) -> list[ShardInfo]:
        """The shards of one manifest entry: one, or those of a brace list."""
        entry = str(sh["path"])
        if missing := [k for k in ("count", "sha256") if k not in sh]:
            raise ManifestError(f"{self.shown}: split '{split}': the shard entry {entry!r} has no {missing[0]}")
        # a brace entry lists one sha256 per shard, so the manifest's own size bounds the names it may make
        # (`{0..99999999}` is refused unexpanded: it would fill the memory); one digest alone: the message below
        listed = isinstance(sh.get("sha256"), list)
        most = len(sh["sha256"]) if listed else 10_000
        try:
            names = remote.expand(entry, limit=max(most, 1)) if "{" in entry else [entry]
        except remote.RemoteError:
            raise ManifestError(f"{self.shown}: split '{split}': the brace entry {remote.redact(entry)!r} names "
                                f"more shards than " + (f"its sha256 list ({most})" if listed else
                                                        f"{most:,} and gives one sha256")) from None
        for name in dict.fromkeys([entry, *names]):  # each name a brace list makes is checked as an entry is
            self._check_name(split, name, entry)

        def each(key: str, value: Any) -> list[Any]:
            """One value per shard: a brace entry's list, or its one value repeated."""
            if len(names) == 1:
                return [value]
            if key in ("sha256", "head_sha256") and not isinstance(value, list):  # one digest cannot fit several
                raise ManifestError(f"{self.shown}: split '{split}': the brace entry {entry!r} names {len(names)} "
                                    f"shards but gives one {key}; list one per shard")
            per_shard = isinstance(value, list) and (key != "fold_counts" or bool(value) and isinstance(value[0], list))
            if not per_shard:
                return [value] * len(names)
            if len(value) != len(names):
                raise ManifestError(f"{self.shown}: split '{split}': the brace entry {entry!r} names "
                                    f"{len(names)} shards but its {key} lists {len(value)}")
            return list(value)

        counts, digests = each("count", sh["count"]), each("sha256", sh["sha256"])
        folds = each("fold_counts", sh["fold_counts"]) if "fold_counts" in sh else [None] * len(names)
        sizes = each("bytes", sh["bytes"]) if "bytes" in sh else [None] * len(names)
        heads = each("head_sha256", sh["head_sha256"]) if "head_sha256" in sh else [None] * len(names)  # one per shard
        try:
            locations = [remote.join(self.root, n) for n in names]
        except remote.RemoteError as e:
            raise ManifestError(f"{self.shown}: split '{split}': {e}") from None
        absolute = entry.startswith(("/", "\\")) or os.path.isabs(entry)  # would become http://host/abs/path
        if self.is_remote and (absolute and remote.is_local(entry) or any(remote.is_local(loc) for loc in locations)):
            raise ManifestError(f"{self.shown}: split '{split}': the shard entry {remote.redact(entry)!r} is not a "
                                "URL or a relative name: a fetched manifest may not name local files")
        def number(key: str, value: Any) -> int:
            if _whole(value):
                return value
            raise ManifestError(f"{self.shown}: split '{split}': the shard entry {entry!r}: {key} must be a whole "
                                f"number from 0 to 2**53 (or, for a brace list, a list of one per shard), got {value!r}")
        for key, values in (("sha256", digests), ("head_sha256", heads)):
            if not all(isinstance(d, str) or d is None and key == "head_sha256" for d in values):
                raise ManifestError(f"{self.shown}: split '{split}': the shard entry {entry!r}: {key} must be a hex "
                                    f"string (or, for a brace list, a list of one per shard), got {sh[key]!r}")
        return [ShardInfo(loc, number("count", c), d, tuple(number("fold_counts", n) for n in f) if f is not None
                          else None, bytes=number("bytes", b) if b is not None else None, head_sha256=h or None,
                          split=split)
                for loc, c, d, f, b, h in zip(locations, counts, digests, folds, sizes, heads, strict=True)]

    @property
    def folds(self) -> int | None:
        """K of a pack made with `--folds K`, else None."""
        folds = self.data.get("folds")
        return int(folds["k"]) if folds else None

    def with_fold(self, fold: int | None, *, train: str = "train", val: str = "val") -> Manifest:
        """The cross-validation view for `data.fold`: split `train` holds the train+val samples of every
        fold but `fold`, split `val` those of `fold`; other splits (test) are unchanged. Counts come
        from the manifest's per-shard fold counts, so sizes need no shard read; readers filter samples
        by their json `fold` (`ShardInfo.is_kept`). `fold` None: this manifest itself.
        Raises FoldError when the pack has no folds or `fold` is outside 0..K-1."""
        if fold is None:
            return self
        k = self.folds
        if k is None:
            raise FoldError(f"data.fold={fold} but {self.shown} has no folds; repack with `bcc pack --folds K`")
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < k:
            raise FoldError(f"data.fold={fold!r} is outside 0..{k - 1} (the pack at {self.root} has {k} folds)")
        info = self.data["folds"]
        pool = [sh for name in info["splits"] for sh in self.split(name).shards]
        if any(sh.fold_counts is None or len(sh.fold_counts) != k for sh in pool):
            raise FoldError(f"{self.shown}: a train/val shard lacks fold_counts for {k} folds; repack it")
        view = Manifest.__new__(Manifest)
        view.__dict__.update(self.__dict__)
        view._splits = dict(self._splits)
        for name, chosen in ((train, frozenset(range(k)) - {fold}), (val, frozenset({fold}))):
            shards = [dataclasses.replace(sh, count=sum(sh.fold_counts[f] for f in chosen), folds=chosen)
                      for sh in pool]
            shards = [sh for sh in shards if sh.count]  # a shard with none of these folds is never opened
            counts = {c: sum(info["class_counts"][f].get(c, 0) for f in chosen) for c in self.classes}
            view._splits[name] = SplitInfo(name, sum(sh.count for sh in shards), counts, shards)
        view.fold = fold
        return view

    def file_list(self, name: str) -> list[dict[str, Any]]:
        """One of the per-file lists (`FILE_LISTS`), inline or from its side file, whose sha256 and
        count are checked against the manifest (ManifestError naming the file otherwise). Absent: []."""
        if name not in FILE_LISTS:
            raise ManifestError(f"unknown list {name!r}; the manifest's per-file lists are {', '.join(FILE_LISTS)}")
        return read_list(self.root, self.shown, name, self.data.get(name) or [])

    def near_duplicates(self) -> list[dict[str, Any]]:
        """The near-duplicate groups (`{"paths", "max_distance", "split"}`), from the side file if large."""
        return self.file_list("near_duplicates")

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
                f"unknown split {name!r} in {self.shown}; available: {', '.join(self._splits) or 'none'}"
            ) from None

    def fingerprint(self) -> str | None:
        """sha256 over every split's shards' (count, sha256), in order: the dataset's content, wherever it
        lives (a local folder, a URL, a `pipe:` store). A resume may read the same dataset from another
        `data.shards` (`bcc.train.resume`). None when a shard has no sha256 to go by."""
        rows = [[name, [[sh.count, sh.sha256] for sh in self.split(name).shards]] for name in self.splits]
        if any(not sh[1] for _, shards in rows for sh in shards):
            return None
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}={s.count}" for n, s in self._splits.items())
        return f"Manifest({remote.display(self.root)!r}, {counts})"


# --------------------------------------------------------------------------- writing


def split_entry(shards: Sequence[Mapping[str, Any]], class_counts: Mapping[str, int]) -> dict[str, Any]:
    """A split's manifest entry from its shards (`{"path": name, "count", "sha256"}`, in order; `bcc pack`
    adds `bytes` and `head_sha256`, see the module docstring) and
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
    skipped: Collection[Mapping[str, str]] = (),
    converted: Collection[Mapping[str, str]] = (),
    duplicates: Collection[Mapping[str, Any]] = (),
    near_duplicates: Collection[Mapping[str, Any]] | None = None,
    folds: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
    name: str | None = None,
) -> dict[str, Any]:
    """Write `out/manifest.json` and `out/_info.json` atomically; returns the manifest.

    `splits` maps a split name to its `split_entry`; shard paths are relative to `out`. `name` is the
    dataset name in `_info.json` (default: `out`'s name). `near_duplicates` (None: not searched) and
    `folds` are the optional parts described in the module docstring. The per-file lists may be lazy
    (anything with `len` and iteration): one naming more than `LIST_INLINE` paths is streamed to its side file.
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
        "skipped": write_list(out, "skipped", skipped, LIST_INLINE),
        "converted": write_list(out, "converted", converted, LIST_INLINE),
        "duplicates": write_list(out, "duplicates", duplicates, LIST_INLINE),
        "warnings": list(warnings),
    }
    if near_duplicates is not None:
        manifest["near_duplicates"] = write_list(out, "near_duplicates", near_duplicates, LIST_INLINE)
    if folds is not None:
        manifest["folds"] = dict(folds)
    write_json(out / "manifest.json", manifest)
    write_json(out / "_info.json", _timm_info(name or out.name, manifest))
    return manifest
