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
index cannot be fetched, is named in a note and checked by shard only. `check_pretrained` compares the
images the bcc run behind `model.pretrained` trained on with the ones a run evaluates (a warning per
split with the count); with `bcc pack --folds K`, `<split>.fold` (int16, -1 outside the folds) lets it
take a `data.fold` view's samples (`view_ids`).
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


_COLUMNS = {"sha": np.uint64, "phash": np.uint64, "fold": np.int16}


def write(manifest: Manifest, splits: Mapping[str, Mapping[str, np.ndarray | None]]) -> None:
    """Write `sample_index.npz` beside the local pack `manifest` atomically: per split name, its columns
    in the split's sample order: `sha` (n uint64 sha256 prefixes, `prefix64`), `phash` (n uint64, or
    None: not hashed), `fold` (n int16, the `--folds` fold id, -1 outside the folds; None: no folds).
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
    sha: dict[str, np.ndarray]  # split -> sha256 prefixes, for the splits it describes as the manifest lists them
    phash: dict[str, np.ndarray]
    fold: dict[str, np.ndarray]
    stale: tuple[str, ...]  # splits whose shards differ from the ones it was written for, or that it lacks


def load(manifest: Manifest, retries: int = remote.DEFAULT_RETRIES,
         timeout_s: float = remote.HTTP_TIMEOUT_S) -> SampleIndex | str:
    """The index beside `manifest` (of the pack's own splits, also for a `data.fold` view), or why there
    is none (a pack made before it existed, a location that cannot be read): a reason for a note, since
    the index is optional. Raises SampleIndexError for one that is there but damaged (not an npz of
    arrays of the splits' lengths)."""
    if manifest.fold is not None:  # the pack's own splits, which the index describes
        manifest = Manifest(manifest.root, manifest.data, allow_pipe=manifest.allow_pipe)
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
    columns: dict[str, dict[str, np.ndarray]] = {k: {} for k in _COLUMNS}
    stale = []
    for name in manifest.splits:
        if str(arrays.get(f"{name}.shards", "")) != split_fingerprint(manifest, name):
            stale.append(name)
            continue
        want = manifest.split(name).count
        for kind, dtype in _COLUMNS.items():
            values = arrays.get(f"{name}.{kind}")
            if values is None:
                continue
            if values.dtype != dtype or values.shape != (want,):
                raise SampleIndexError(f"{shown} is damaged: {name}.{kind} holds {values.shape} {values.dtype} values, "
                                       f"not the {want} {np.dtype(dtype)} of split '{name}'; repack, or remove it")
            columns[kind][name] = values
    return SampleIndex(shown, columns["sha"], columns["phash"], columns["fold"], tuple(stale))


def view_ids(manifest: Manifest, index: SampleIndex, split: str, train: str, val: str) -> np.ndarray | None:
    """The sha256 prefixes of the samples `manifest`'s split `split` holds: the pack's split itself, or,
    in a `data.fold` view, the train+val samples of the other folds (`split` == `train`) or of the fold
    (`split` == `val`). None when the index lacks what that takes."""
    if manifest.fold is None or split not in (train, val):
        return index.sha.get(split)
    pool = manifest.data["folds"]["splits"]
    if any(s not in index.sha or s not in index.fold for s in pool):
        return None
    sha = np.concatenate([index.sha[s] for s in pool])
    fold = np.concatenate([index.fold[s] for s in pool])
    return sha[fold == manifest.fold] if split == val else sha[(fold != manifest.fold) & (fold >= 0)]


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


def _run_dir(weights: Path) -> Path | None:
    """The bcc run directory a weights file belongs to (RUN/model_best.safetensors,
    RUN/checkpoints/step-N/model.safetensors): the nearest folder above with a config.yaml."""
    for folder in list(weights.parents)[:3]:
        if (folder / "config.yaml").is_file() and ((folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file()):
            return folder
    return None


def _indexed(manifest: Manifest, retries: int, timeout_s: float) -> list[tuple[Manifest, SampleIndex | str]]:
    """Each pack of `manifest` (the sources of a `MixedManifest`, or itself) with its index, or why none."""
    packs = [s.manifest for s in manifest.sources] if hasattr(manifest, "sources") else [manifest]
    return [(m, load(m, retries, timeout_s)) for m in packs]


def check_pretrained(cfg, manifest: Manifest, splits: Sequence[str]) -> list[str]:
    """Warnings for images this run evaluates (`splits` of `manifest`, its val and test) that the bcc run
    behind `cfg.model.pretrained` trained on: its scores there would be flattered, since the backbone
    (and maybe the heads) already learned those images with their labels. The source run's data comes
    from its config.yaml (its `data.shards` or `data.sources`, its fold view); matched by source-file
    sha256 through both sides' sample indexes. Sources that are no bcc run (the hub, a file, an export)
    have no record of their data: nothing to check. A record that cannot be read is one note."""
    from bcc.config import load_saved_config
    from bcc.sources import load_data
    from bcc.weights import resolve_source

    if not cfg.model.pretrained:
        return []
    try:
        source = resolve_source(cfg.model.pretrained, cfg.model.backbone)
    except BccError:  # building the model names what is wrong with it
        return []
    run = _run_dir(source.weights) if source.weights is not None and source.kind in ("run", "checkpoint", "file") else None
    if run is None:
        return []
    data, retries, timeout_s = cfg.data, cfg.data.retries, cfg.data.read_timeout_s
    unchecked = f"whether the run {run} behind model.pretrained trained on images this run evaluates is not checked"
    try:
        theirs = load_saved_config(run / "config.yaml").data
        packs = _indexed(load_data(theirs), retries, timeout_s)
    except BccError as e:
        return [f"note: {unchecked}: its data cannot be read ({e})"]
    trained = [view_ids(m, index, theirs.train_split, theirs.train_split, theirs.val_split)
               if not isinstance(index, str) else index for m, index in packs]
    out = [f"note: {unchecked} for {m.shown}: " + (ids if isinstance(ids, str) else
                                                    f"its {FILE} does not describe its training split as it is now")
           for (m, _), ids in zip(packs, trained, strict=True) if ids is None or isinstance(ids, str)]
    trained = [t for t in trained if isinstance(t, np.ndarray)]
    seen = np.unique(np.concatenate(trained or [np.zeros(0, np.uint64)]))
    for m, index in _indexed(manifest, retries, timeout_s) if seen.size else ():
        if isinstance(index, str):
            out.append(f"note: {unchecked} for {m.shown}: {index}")
            continue
        for split in splits:
            ids = view_ids(m, index, split, data.train_split, data.val_split) if split in m.splits else None
            if ids is None and split in m.splits:
                out.append(f"note: {unchecked} for split '{split}' of {m.shown}: its {FILE} does not describe it "
                           "as it is now")
            if ids is None or not ids.size:
                continue
            shared = int(np.isin(np.unique(ids), seen).sum())
            if shared:
                out.append(f"warning: model.pretrained {source.given}: its run {run} trained on {shared} of the "
                           f"{np.unique(ids).size} images of split '{split}' of {m.shown} (by source-file sha256): "
                           "scores there are flattered; pretrain on images this run does not evaluate (the same "
                           "pack and split, or a pack without them)")
    return out
