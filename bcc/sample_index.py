"""Which source images a pack holds, per split: the overlap checks across `data.sources` and against
the run behind `model.pretrained`.

Two packs made from overlapping folders (another `--resize`, seed or split fraction, a folder copied
into two datasets, re-encoded copies) hold the same image in different shards: the start-up check by
shard (`bcc.verify.repeated_shards`) cannot see it, and an image in one source's train split and
another's val or test split would be trained on and scored. `bcc pack` therefore writes
`sample_index.npz` beside manifest.json (numpy's npz, read with `allow_pickle=False`; ~20 bytes a
sample, 20 MB at a million). Per split, in the split's sample order (sample p is the one keyed
`f"{split}-{p:08d}"`):

- `<split>.shards`: sha256 over the split's shards' (count, sha256) as the manifest lists them; a split
  whose manifest entries changed since (edited by hand), or an index copied beside another pack, is not
  trusted: checked by shard only, said in a note (`bcc pack --verify`: a mismatch);
- `<split>.sha`: the first 8 bytes of each sample's source-file sha256 (the json's `sha256`) as a
  big-endian uint64 (two different files share one with probability ~2^-64 a pair);
- `<split>.label`: each sample's leaf class index (int16);
- `<split>.phash`: the 64-bit pHash (the json's `phash`), when the pack hashed images (near-duplicate
  grouping on);
- `<split>.fold`: the `--folds` fold id (int16, -1 outside the folds), when the pack has folds.

`check_sources` (the start-up of a run with `data.sources`) compares every two sources over train, val
and test: an image of one source's train split whose file (sha256) or picture (pHash within
`bcc.neardup.DEFAULT_THRESHOLD` bits, joined into groups as the packer joins them: no all-pairs
comparison) is in another source's val or test split is an error (`data.source_overlap=warn`: a
warning; `off`: not checked), counted per pair of splits; images two train splits share are a note
(a warning when their classes differ), as are images two evaluated splits share. A source packed before
the index existed (or served without it) is named in a note and checked by shard only; an index that
is there but cannot be read is an error. `bcc.pretrained_overlap` compares the images the bcc run
behind `model.pretrained` trained on (its config's data and fold, `view_ids`) with the ones a run
evaluates. `pack_images` gives a pack's images per class over all its splits
(`bcc compare --packs` checks that its packs hold the same images).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bcc import remote
from bcc.errors import BccError
from bcc.manifest import Manifest

__all__ = ["FILE", "SampleIndex", "SampleIndexError", "check_sources", "load", "pack_images", "prefix64", "view_ids",
           "write"]

FILE = "sample_index.npz"
MAX_SAMPLES = 10**9  # what an index may claim to describe when fetched; a bound on the read
_COLUMNS = {"sha": np.uint64, "label": np.int16, "phash": np.uint64, "fold": np.int16}
_FIX = "copy it again from the pack (or repack), remove it, or set data.source_overlap=ignore"


class SampleIndexError(BccError):
    """A sample index that is there but cannot be read or is damaged, or images shared across sources'
    train and evaluated splits (`data.source_overlap=error`)."""


def prefix64(sha: np.ndarray) -> np.ndarray:
    """(n, 32) uint8 sha256 digests -> (n,) uint64: each digest's first 8 bytes read big-endian (the
    first 16 hex digits of the json's `sha256`)."""
    sha = np.ascontiguousarray(np.asarray(sha, dtype=np.uint8).reshape(-1, 32)[:, :8])
    return sha.view(">u8").ravel().astype(np.uint64)


def split_fingerprint(manifest: Manifest, split: str) -> str:
    """sha256 over `split`'s shards' [count, sha256] as `manifest` lists them (JSON)."""
    return hashlib.sha256(json.dumps([[sh.count, sh.sha256] for sh in manifest.split(split).shards]).encode()).hexdigest()


def write(manifest: Manifest, splits: Mapping[str, Mapping[str, np.ndarray | None]]) -> None:
    """Write `sample_index.npz` beside the local pack `manifest` atomically: per split name, its columns
    in the split's sample order (see the module docstring; a column given as None is left out).
    Raises OSError (a full disk) with nothing written."""
    from bcc.atomic import atomic_write

    arrays: dict[str, np.ndarray] = {}
    for name, columns in splits.items():
        arrays[f"{name}.shards"] = np.array(split_fingerprint(manifest, name))
        arrays.update({f"{name}.{k}": np.asarray(v, dtype=_COLUMNS[k]) for k, v in columns.items() if v is not None})
    with atomic_write(Path(manifest.root) / FILE, "wb") as f:
        np.savez(f, **arrays)


@dataclass(frozen=True)
class SampleIndex:
    location: str  # as messages show it
    columns: dict[str, dict[str, np.ndarray]]  # column -> split -> values, for the splits it describes
    stale: tuple[str, ...]  # splits whose manifest entries differ from the ones it was written for, or it lacks

    @property
    def sha(self) -> dict[str, np.ndarray]:
        return self.columns["sha"]


def _members(raw: bytes, shown: str, names: Sequence[str], counts: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The npz members `names` (without ".npy") present in `raw`, each checked against the size its
    split's count allows before it is read (a small compressed file must not unpack to gigabytes)."""
    from bcc.remote_secrets import quote_bytes

    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile:
        raise SampleIndexError(f"{shown} is damaged: a zip file that cannot be read (it begins "
                               f"{quote_bytes(raw[:100])}); {_FIX}") from None
    sizes = {i.filename.removesuffix(".npy"): i.file_size for i in archive.infolist()}
    out = {}
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        for name in (n for n in names if n in sizes):
            if sizes[name] > 8 * counts.get(name.split(".")[0], 0) + 4096:
                raise SampleIndexError(f"{shown} is damaged: {name} unpacks to {sizes[name]:,} bytes, more than its "
                                       f"split's samples take; {_FIX}")
            try:
                out[name] = npz[name]
            except Exception as e:  # noqa: BLE001 - object arrays (pickles), a damaged member: numpy's many errors
                what = "holds objects, not numbers" if "pickle" in str(e) else f"cannot be read ({type(e).__name__})"
                raise SampleIndexError(f"{shown} is damaged: {name} {what}; {_FIX}") from None
    return out


def load(manifest: Manifest, retries: int = remote.DEFAULT_RETRIES,
         timeout_s: float = remote.HTTP_TIMEOUT_S) -> SampleIndex | str:
    """The index beside `manifest` (of the pack's own splits, also for a `data.fold` view), or why there
    is none (a pack made before it existed, a server without the file): a reason for a note. Raises
    SampleIndexError for one that is there but cannot be read or is damaged."""
    if manifest.fold is not None:  # the pack's own splits, which the index describes
        manifest = Manifest(manifest.root, manifest.data, allow_pipe=manifest.allow_pipe)
    location = remote.join(manifest.root, FILE)
    shown = remote.display(location)
    counts = {n: manifest.split(n).count for n in manifest.splits}
    try:
        raw = remote.read_bytes(location, retries, limit=32 * min(sum(counts.values()), MAX_SAMPLES) + (1 << 20),
                                timeout_s=timeout_s, what=f"the index of {sum(counts.values()):,} samples")
    except FileNotFoundError:
        return f"it has no {FILE} (packed by an older bcc)"
    except remote.RemoteError as e:
        if e.missing:
            return f"the server has no {FILE} ({e})"
        raise SampleIndexError(f"{shown} cannot be read: {e}; {_FIX}") from None
    except OSError as e:
        raise SampleIndexError(f"{shown} cannot be read: {e.strerror or e}; {_FIX}") from None
    if not raw.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # no zip: a server's page for a missing file, most often
        from bcc.remote_secrets import quote_bytes

        return (f"its {FILE} is no index (it begins {quote_bytes(raw[:100])})" if raw else f"its {FILE} is empty")
    names = [f"{n}.{k}" for n in manifest.splits for k in ("shards", *_COLUMNS)]
    arrays = _members(raw, shown, names, counts)
    columns: dict[str, dict[str, np.ndarray]] = {k: {} for k in _COLUMNS}
    stale = []
    for name, want in counts.items():
        if f"{name}.sha" not in arrays or str(arrays.get(f"{name}.shards", "")) != split_fingerprint(manifest, name):
            stale.append(name)
            continue
        for kind, dtype in _COLUMNS.items():
            values = arrays.get(f"{name}.{kind}")
            if values is None:
                continue
            if values.dtype != dtype or values.shape != (want,):
                raise SampleIndexError(f"{shown} is damaged: {name}.{kind} holds {values.shape} {values.dtype} values, "
                                       f"not the {want} {np.dtype(dtype)} of split '{name}'; {_FIX}")
            columns[kind][name] = values
    return SampleIndex(shown, columns, tuple(stale))


def pack_images(manifest: Manifest, retries: int = remote.DEFAULT_RETRIES,
                timeout_s: float = remote.HTTP_TIMEOUT_S) -> dict[int, np.ndarray] | str:
    """Every image the pack of `manifest` holds, over all its splits however they are split: per leaf
    class index, the sorted sha256 prefixes (`prefix64`) of its samples, repeats kept (a multiset), or
    why the index cannot say (the pack has none, or it does not describe every split: a reason for a
    note). Raises SampleIndexError for an index that is there but damaged."""
    index = load(manifest, retries, timeout_s)
    if isinstance(index, str):
        return index
    names = list(manifest.splits)
    lacking = [n for n in names if n not in index.sha or n not in index.columns["label"]]
    if lacking:
        return (f"{index.location} does not describe split(s) {', '.join(repr(n) for n in lacking)} as the "
                "manifest lists them")
    sha = np.concatenate([index.sha[n] for n in names]) if names else np.zeros(0, np.uint64)
    label = np.concatenate([index.columns["label"][n] for n in names]) if names else np.zeros(0, np.int16)
    return {int(c): np.sort(sha[label == c]) for c in np.unique(label)}


def view_ids(manifest: Manifest, index: SampleIndex, split: str, train: str, val: str,
             column: str = "sha") -> np.ndarray | None:
    """The `column` values (sha256 prefixes, pHashes) of the samples `manifest`'s split `split` holds: the
    pack's split itself, or, in a `data.fold` view, the train+val samples of the other folds (`split` ==
    `train`) or of the fold (`split` == `val`). None when the index lacks what that takes."""
    values = index.columns[column]
    if manifest.fold is None or split not in (train, val):
        return values.get(split)
    pool, folds = manifest.data["folds"]["splits"], index.columns["fold"]
    if any(s not in values or s not in folds for s in pool):
        return None
    sha = np.concatenate([values[s] for s in pool])
    fold = np.concatenate([folds[s] for s in pool])
    return sha[fold == manifest.fold] if split == val else sha[(fold != manifest.fold) & (fold >= 0)]


def _key(split: str, position: int) -> str:
    return f"{split}-{position:08d}"


@dataclass(frozen=True)
class _Part:
    source: int  # index into the sources
    split: str
    index: SampleIndex


def _near_roots(parts: Sequence[_Part], threshold: int) -> list[np.ndarray | None]:
    """Per part, each sample's near-duplicate group over all parts with pHashes (the root id of its
    component: pHashes within `threshold` bits joined, chains too, as the packer groups), or None
    for a part without pHashes. Runs over distinct hashes: O(n) memory, no all-pairs comparison."""
    from bcc.neardup import near_duplicate_roots

    have = [p.index.columns["phash"].get(p.split) for p in parts]
    distinct = [np.unique(h, return_inverse=True) if h is not None else None for h in have]
    values = [d[0] for d in distinct if d is not None]
    if not values:
        return [None] * len(parts)
    every = np.concatenate(values)
    root = near_duplicate_roots(every, threshold)
    out, offset = [], 0
    for d in distinct:
        if d is None:
            out.append(None)
            continue
        out.append(root[offset + d[1].ravel()])
        offset += len(d[0])
    return out


def check_sources(sources: Sequence, splits: Mapping[str, str], mode: str = "error", *,
                  retries: int = remote.DEFAULT_RETRIES, timeout_s: float = remote.HTTP_TIMEOUT_S) -> list[str]:
    """Compare every two of `sources` (`bcc.sources.Source`: name, weight, manifest) over the splits a
    run reads (`splits`: config key -> split name; give the test split even when the run does not test
    at its end: a later `bcc eval` will). Raises SampleIndexError for images of one source's train split
    that another source's val or test split holds too (the file, or a near-identical picture), counted
    per pair of splits, with one sample key of each side (`mode` "error"), or for an index that cannot be
    read. Returns the lines to print, each starting "warning:" or "note:"."""
    from bcc.neardup import DEFAULT_THRESHOLD

    if mode == "ignore" or len(sources) < 2:
        return []
    train = splits.get("data.train_split")
    names = list(dict.fromkeys(splits.values()))
    lines: list[str] = []
    parts: list[_Part] = []
    for i, s in enumerate(sources):
        index = load(s.manifest, retries, timeout_s)
        if isinstance(index, str):
            lines.append(f"note: data.sources[{i}] ('{s.name}'): {index}; images it shares with another source are "
                         "found only where whole shards repeat")
            continue
        stale = [n for n in names if n in index.stale and n in s.manifest.splits]
        if stale:
            lines.append(f"note: data.sources[{i}] ('{s.name}'): {index.location} does not describe split(s) "
                         f"{', '.join(repr(n) for n in stale)} as the manifest lists them (edited since it was "
                         "packed, or an index of another pack); those are checked by shard only")
        parts += [_Part(i, n, index) for n in names if n in index.sha]
        if any(n not in index.columns["phash"] for n in names if n in index.sha):
            lines.append(f"note: data.sources[{i}] ('{s.name}'): packed without pHashes (--no-near-dup): its images "
                         "are compared with the other sources' by file only, not by picture")
    roots = _near_roots(parts, DEFAULT_THRESHOLD)
    leaks: dict[str, list] = {"same": [], "near": []}  # the same file or picture; a near-identical picture
    for t, pt in enumerate(parts):
        for o, po in enumerate(parts):
            if pt.source == po.source or pt.split != train or po.split == train:
                continue
            exact = np.isin(po.index.sha[po.split], pt.index.sha[pt.split])
            ph_t, ph_o = pt.index.columns["phash"].get(pt.split), po.index.columns["phash"].get(po.split)
            same = exact | (np.isin(ph_o, ph_t) if ph_t is not None and ph_o is not None else False)
            near = (np.isin(roots[o], roots[t]) & ~same) if roots[t] is not None and roots[o] is not None else same & False
            for kind, hit in (("same", same), ("near", near)):
                if hit.any():
                    first = int(np.flatnonzero(hit)[0])
                    mate = (np.flatnonzero(pt.index.sha[pt.split] == po.index.sha[po.split][first]) if exact[first]
                            else np.flatnonzero(ph_t == ph_o[first]) if kind == "same"
                            else np.flatnonzero(roots[t] == roots[o][first]))
                    leaks[kind].append((int(hit.sum()), int((exact & hit).sum()), pt, po, int(mate[0]), first))

    def pairs(found: list) -> str:
        return "; ".join(f"{n} of '{sources[po.source].name}' split '{po.split}' in '{sources[pt.source].name}' split "
                         f"'{pt.split}' (" + (f"{k} the same file; " if found is leaks["same"] else "")
                         + f"e.g. sample {_key(po.split, b)} and {_key(pt.split, a)})" for n, k, pt, po, a, b in found)

    fix = ("pack the overlapping folders together (one pack keeps copies and near-copies on one side), or set "
           "data.source_overlap=warn (train anyway) or ignore (no check)")
    if leaks["same"]:
        text = (f"data.sources: {sum(n for n, *_ in leaks['same'])} image(s) trained on in one source are evaluated "
                f"in another (the same file by sha256, or the same picture re-encoded: an equal pHash): "
                f"{pairs(leaks['same'])}")
        if mode == "error":
            raise SampleIndexError(f"{text}. They would be trained on and scored; {fix}")
        lines.append(f"warning: {text}: their scores are flattered")
    if leaks["near"]:  # near is not the same: a warning to look at them, never a refusal
        lines.append(f"warning: data.sources: {sum(n for n, *_ in leaks['near'])} image(s) evaluated in one source "
                     f"have a near-identical picture (pHash within {DEFAULT_THRESHOLD} bits) trained on in another: "
                     f"{pairs(leaks['near'])}; if they are the same field re-shot, {fix.split(', or set')[0]}")
    for pt in parts:  # shared files that do not leak
        for po in parts:
            if pt.source >= po.source or (pt.split == train) != (po.split == train):
                continue
            common, ia, ib = np.intersect1d(pt.index.sha[pt.split], po.index.sha[po.split], return_indices=True)
            if not common.size:
                continue
            where = (f"'{sources[pt.source].name}' split '{pt.split}' and '{sources[po.source].name}' split "
                     f"'{po.split}' (e.g. sample {_key(pt.split, int(ia[0]))} and {_key(po.split, int(ib[0]))})")
            la, lb = pt.index.columns["label"].get(pt.split), po.index.columns["label"].get(po.split)
            other = int(np.count_nonzero(la[ia] != lb[ib])) if la is not None and lb is not None else 0
            what = ("read once per source each epoch" if pt.split == train
                    else f"scored twice in the combined '{pt.split}' metrics" if pt.split == po.split else "evaluated in both")
            lines.append(f"warning: data.sources: {common.size} image(s) are in both {where}: {what}; {other} of them "
                         "with another class in each source" if other else
                         f"note: data.sources: {common.size} image(s) are in both {where}: {what}")
    return lines
