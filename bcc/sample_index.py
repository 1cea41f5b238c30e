"""Which source images a pack holds, per split: the overlap check across `data.sources`.

Two packs made from overlapping folders (another `--resize`, seed or split fraction, a folder copied
into two datasets) hold the same image in different shards: the start-up check by shard
(`bcc.verify.repeated_shards`) cannot see it, and an image in one source's train split and another's
test split would be trained on and scored. `bcc pack` therefore writes `sample_index.npz` beside
manifest.json (numpy's npz, read with `allow_pickle=False`; 16 bytes a sample, 16 MB at a million):

- per split, in the split's sample order (sample p is the one keyed `f"{split}-{p:08d}"`):
  `<split>.sha`, the first 8 bytes of each sample's source-file sha256 (the json's `sha256`) as a
  big-endian uint64 (two different images share one with probability ~2^-64 a pair), and, when the
  pack hashed images for near-duplicate grouping, `<split>.phash`, the 64-bit pHash (the json's `phash`);
  `<split>.shards`, the sha256 over the split's shards' (count, sha256) as the manifest lists them, so
  a split whose shards were changed by hand, or an index copied beside another pack, is not trusted:
  such a split is checked by shard only (said in a note; `bcc pack --verify` calls it a mismatch).

`check_sources` compares every two sources over the splits a run reads: the same image in one source's
train split and another's val or test split is an error (exact copies), a near-identical one (pHash
within `bcc.neardup.DEFAULT_THRESHOLD` bits, pairs found by `bcc.neardup.near_pairs`, never all pairs)
a note, as are images shared by two train splits (read once per source per epoch) or by two evaluated
splits (scored twice in the combined metrics). A source packed before this file existed, or whose
index cannot be fetched, is named in a note and checked by shard only.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bcc import remote
from bcc.errors import BccError
from bcc.manifest import Manifest

__all__ = ["FILE", "SampleIndex", "SampleIndexError", "check_sources", "load", "prefix64", "write"]

FILE = "sample_index.npz"
MAX_SAMPLES = 10**9  # what an index may claim to describe when fetched (16 GB); a bound on the read


class SampleIndexError(BccError):
    """A sample index that is damaged or belongs to another pack, or images shared across sources'
    train and evaluated splits."""


def prefix64(sha: np.ndarray) -> np.ndarray:
    """(n, 32) uint8 sha256 digests -> (n,) uint64: each digest's first 8 bytes read big-endian (the
    first 16 hex digits of the json's `sha256`)."""
    sha = np.ascontiguousarray(np.asarray(sha, dtype=np.uint8).reshape(-1, 32)[:, :8])
    return sha.view(">u8").ravel().astype(np.uint64)


def split_fingerprint(manifest: Manifest, split: str) -> str:
    """sha256 over `split`'s shards' [count, sha256] as `manifest` lists them (JSON)."""
    return hashlib.sha256(json.dumps([[sh.count, sh.sha256] for sh in manifest.split(split).shards]).encode()).hexdigest()


def write(manifest: Manifest, splits: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
    """Write `sample_index.npz` beside the local pack `manifest` atomically: per split name, (n uint64
    sha256 prefixes (`prefix64`), n uint64 pHashes or None) in the split's sample order. Raises OSError
    (a full disk) with nothing written."""
    from bcc.atomic import atomic_write

    arrays: dict[str, np.ndarray] = {}
    for name, (sha, phash) in splits.items():
        arrays[f"{name}.shards"] = np.array(split_fingerprint(manifest, name))
        arrays[f"{name}.sha"] = np.asarray(sha, dtype=np.uint64)
        if phash is not None:
            arrays[f"{name}.phash"] = np.asarray(phash, dtype=np.uint64)
    with atomic_write(Path(manifest.root) / FILE, "wb") as f:
        np.savez(f, **arrays)


@dataclass(frozen=True)
class SampleIndex:
    location: str  # as messages show it
    sha: dict[str, np.ndarray]  # split -> digests prefixes, for the splits it describes as the manifest lists them
    phash: dict[str, np.ndarray]
    stale: tuple[str, ...]  # splits whose shards differ from the ones it was written for, or that it lacks


def load(manifest: Manifest, retries: int = remote.DEFAULT_RETRIES,
         timeout_s: float = remote.HTTP_TIMEOUT_S) -> SampleIndex | str:
    """The index beside `manifest`, or why there is none (a pack made before it existed, a location
    that cannot be read): a reason for a note, since the index is optional. Raises SampleIndexError for
    one that is there but damaged (not an npz of uint64 arrays of the splits' lengths)."""
    location = remote.join(manifest.root, FILE)
    shown = remote.display(location)
    count = sum(manifest.split(n).count for n in manifest.splits)
    try:
        raw = remote.read_bytes(location, retries, limit=32 * min(count, MAX_SAMPLES) + (1 << 20), timeout_s=timeout_s)
    except FileNotFoundError:
        return f"it has no {FILE} (packed by an older bcc)"
    except (OSError, remote.RemoteError) as e:
        return f"its {FILE} cannot be read ({getattr(e, 'strerror', None) or e})"
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:  # noqa: BLE001 - not a zip, a damaged member, an object array: numpy's many errors
        raise SampleIndexError(f"{shown} is damaged ({type(e).__name__}: {e}); repack, or remove it to train "
                               "without the check across sources") from None
    sha, phash, stale = {}, {}, []
    for name in manifest.splits:
        if str(arrays.get(f"{name}.shards", "")) != split_fingerprint(manifest, name):
            stale.append(name)
            continue
        want = manifest.split(name).count
        for kind, into in (("sha", sha), ("phash", phash)):
            values = arrays.get(f"{name}.{kind}")
            if values is None:
                continue
            if values.dtype != np.uint64 or values.shape != (want,):
                raise SampleIndexError(f"{shown} is damaged: {name}.{kind} holds {values.shape} {values.dtype} values, "
                                       f"not the {want} uint64 of split '{name}'; repack, or remove it")
            into[name] = values
    return SampleIndex(shown, sha, phash, tuple(stale))


def _key(split: str, position: int) -> str:
    return f"{split}-{position:08d}"


@dataclass(frozen=True)
class _Parts:
    """The distinct values of several (source, split) arrays in one array: `values[k]` came from part
    `part[k]`, first at position `pos[k]` of that part's array (the sample it names)."""
    values: np.ndarray
    part: np.ndarray
    pos: np.ndarray

    @classmethod
    def of(cls, arrays: Sequence[np.ndarray]) -> _Parts:
        distinct = [np.unique(a, return_index=True) for a in arrays]
        return cls(np.concatenate([v for v, _ in distinct]) if distinct else np.zeros(0, np.uint64),
                   np.repeat(np.arange(len(arrays)), [len(v) for v, _ in distinct]),
                   np.concatenate([i for _, i in distinct]) if distinct else np.zeros(0, np.int64))


def _equal_pairs(parts: _Parts) -> np.ndarray:
    """(k, l) rows, k < l indices into `parts` of equal values from different parts: one sort, then
    equal neighbours d apart for each d below the longest run (at most the number of parts)."""
    order = np.argsort(parts.values, kind="stable")
    v = parts.values[order]
    rows = []
    for d in range(1, len(np.unique(parts.part)) if len(v) else 1):
        same = np.flatnonzero(v[d:] == v[:-d])
        if not same.size:
            break
        rows.append(np.stack([order[same], order[same + d]], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)


def check_sources(sources: Sequence, splits: Mapping[str, str], *, retries: int = remote.DEFAULT_RETRIES,
                  timeout_s: float = remote.HTTP_TIMEOUT_S) -> list[str]:
    """Compare every two of `sources` (`bcc.sources.Source`: name, weight, manifest) over the splits a
    run reads (`splits`: config key -> split name, e.g. {"data.train_split": "train", ...}). Raises
    SampleIndexError naming both sources, both splits, the count and one sample key of each for images
    in one source's train split and another's evaluated split; returns the notes to print (near-identical
    images there, images shared by two train or two evaluated splits, sources without an index).

    One sort of every read split's distinct digests and one near-duplicate search over their distinct
    pHashes (`bcc.neardup.near_pairs`), not one per pair of sources: at a million train images the
    search costs about as much as the packer's (~10 s of one core), once, on the main process."""
    from bcc.neardup import DEFAULT_THRESHOLD, near_pairs

    train = splits.get("data.train_split")
    names = list(dict.fromkeys(splits.values()))
    notes: list[str] = []
    parts = []  # (source index, split name, its source's SampleIndex) of every split read
    for i, s in enumerate(sources):
        index = load(s.manifest, retries, timeout_s)
        if isinstance(index, str):
            notes.append(f"data.sources[{i}] ('{s.name}'): {index}; images shared with another source are "
                         "found only where whole shards repeat")
            continue
        stale = [n for n in names if n in index.stale]
        if stale:
            notes.append(f"data.sources[{i}] ('{s.name}'): {index.location} does not describe split(s) "
                         f"{', '.join(repr(n) for n in stale)} as the manifest lists them (shards changed since "
                         "it was packed, or an index of another pack); those are checked by shard only")
        parts += [(i, n, index) for n in names if n in index.sha]
    if len({i for i, _, _ in parts}) < 2:
        return notes

    def where(p: int, q: int) -> str:
        (i, na, _), (j, nb, _) = parts[p], parts[q]
        return f"'{sources[i].name}' split '{na}' and '{sources[j].name}' split '{nb}'"

    exact = _Parts.of([index.sha[n] for _, n, index in parts])
    found: dict[tuple[int, int], list[int]] = {}  # (part, part) -> [count, position, position]
    for k, m in _equal_pairs(exact).tolist():
        p, q = sorted((int(exact.part[k]), int(exact.part[m])))
        if parts[p][0] != parts[q][0]:
            a, b = (k, m) if exact.part[k] == p else (m, k)
            found.setdefault((p, q), [0, int(exact.pos[a]), int(exact.pos[b])])[0] += 1
    for (p, q), (count, pa, pb) in sorted(found.items()):
        shown, na, nb = where(p, q), parts[p][1], parts[q][1]
        sample = f"e.g. sample {_key(na, pa)} and {_key(nb, pb)}"
        if (na == train) != (nb == train):
            raise SampleIndexError(
                f"data.sources: {count} image(s) are in both {shown} (the same source file, by sha256; {sample}): "
                "they would be trained on and scored. Pack the overlapping folders together (one pack keeps "
                "copies on one side), or repack one source without them")
        what = ("read once per source each epoch, as if weighted twice" if na == train
                else f"scored twice in the combined '{na}' metrics" if na == nb else "evaluated in both")
        notes.append(f"data.sources: {count} image(s) are in both {shown} ({sample}): {what}")

    with_phash = [p for p, (_, n, index) in enumerate(parts) if n in index.phash]
    near = _Parts.of([parts[p][2].phash[parts[p][1]] for p in with_phash])
    leaks: dict[tuple[int, int], tuple[set, int, int]] = {}  # (train part, other part) -> (other values, positions)
    for k, m, _ in near_pairs(near.values, DEFAULT_THRESHOLD).tolist():
        p, q = with_phash[int(near.part[k])], with_phash[int(near.part[m])]
        if parts[p][0] == parts[q][0] or (parts[p][1] == train) == (parts[q][1] == train):
            continue
        (t, pt), (o, po) = ((p, k), (q, m)) if parts[p][1] == train else ((q, m), (p, k))
        seen = leaks.setdefault((t, o), (set(), int(near.pos[pt]), int(near.pos[po])))
        seen[0].add(po)
    for (t, o), (others, pt, po) in sorted(leaks.items()):
        (i, nt, _), (j, no, _) = parts[t], parts[o]
        first, second = sorted([(i, nt, pt), (j, no, po)])
        shown = f"'{sources[first[0]].name}' split '{first[1]}' and '{sources[second[0]].name}' split '{second[1]}'"
        notes.append(f"data.sources: {len(others)} image(s) of {shown} have a near-identical image on the other side "
                     f"(pHash within {DEFAULT_THRESHOLD} bits; e.g. sample {_key(first[1], first[2])} and "
                     f"{_key(second[1], second[2])}), near-duplicates trained on and scored flatter the metrics")
    return notes
