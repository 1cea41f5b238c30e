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
and test: an image of one source's train split whose file (sha256) or picture (pHashes within
`bcc.neardup.SAME_PICTURE_BITS`, 4 bits, joined into groups as the packer joins them: no all-pairs
comparison) is in another source's val or test split is an error (`data.source_overlap=warn`: a
warning; `ignore`: not checked), counted per pair of splits; a near-identical picture there (5 to
`DEFAULT_THRESHOLD`, 6 bits) is a warning, counted and named. The radii are measured: re-encodes of one
image 0-4 bits apart, different synthetic images 8 or more, one real pair of different fields 6 (pHash
distances are even: 5 does not occur). Images two train splits share are a note (a warning when their
classes differ), as are images two evaluated splits share. Messages name a source by its name and its
manifest's location (`bcc.sources.Source.label`).

The index must be there (`load`): every pack of manifest format `INDEXED_SINCE` (6) on has one, so one
missing beside such a manifest was lost, an error like one that is damaged (empty, not a zip) or
cannot be read, and `bcc pack --verify` reports either (`bcc.verify.check_index`). Only a pack of an
older format without one is checked by shard only, said in a note with how to get the check where the
pack is read (a folder, a server, a `pipe:` store). Over http a 404 or a web page sent in its place is
"not there", an empty or foreign body the server sent as the file is damage; a `pipe:` command cannot
tell "not there" from "failed", so a failure, no output or a web page is "not there".
`bcc.pretrained_overlap` compares the images the bcc run
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
INDEXED_SINCE = 6  # the first manifest format whose packs always have an index (bcc pack began writing it in format 5)
_FIX = "copy it again from the packed output, or re-pack (bcc pack --verify LOCATION checks it)"
# how a run goes on without the index: added by the run's checks, not by `load` (bcc compare and --verify have none)
OPT_OUT = "or set data.source_overlap=ignore (no sample index is read: no overlap check across sources or with model.pretrained)"


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


def _absent(manifest: Manifest, shown: str, why: str, detail: str, where: str | None) -> str:
    """The note for an index that is not there (`why`, as a note says it; `detail`: what the server or
    command said), or SampleIndexError when the manifest's format says the pack was made with one
    (`INDEXED_SINCE`): then the file was lost, and a leak would go unseen. `where`: how to put one where
    this location is read (None: a local pack, where re-packing writes it)."""
    version = manifest.format_version
    if version >= INDEXED_SINCE:
        raise SampleIndexError(f"{shown} is missing" + (f" ({detail})" if detail else "") + f": {manifest.shown} is "
                               f"format bcc-shards/{version}, whose packs always have one, so it was lost on the way "
                               f"(a copy or an upload that left it out); "
                               + (f"{where}, or re-pack" if where else "copy it again from the packed output, or re-pack")
                               + " (bcc pack --verify LOCATION checks it)")
    return (f"{why}" + (f" ({detail})" if detail else "") + f": packed before bcc always wrote one (manifest format "
            f"bcc-shards/{version}); to have its images compared, re-pack it with this bcc"
            + (f" and {where}" if where else ""))


def load(manifest: Manifest, retries: int = remote.DEFAULT_RETRIES,
         timeout_s: float = remote.HTTP_TIMEOUT_S) -> SampleIndex | str:
    """The index beside `manifest` (of the pack's own splits, also for a `data.fold` view), or the note
    to print when a pack made before the index has none (a reason, with how to get the check).

    Raises SampleIndexError naming the file for one that is there but cannot be read or is damaged: a
    local file that is empty or no zip; an http(s) body that is empty or neither a zip nor a web page;
    a `pipe:` output that is neither. And for one that is not there (a local file missing, HTTP 404 or
    410, a web page in its place: a server's page for a missing file; a `pipe:` command that fails or
    prints nothing, which cannot say why) when the manifest is of format `INDEXED_SINCE` or later, whose
    packs always have one: the file was lost, and a leak would go unseen."""
    if manifest.fold is not None:  # the pack's own splits, which the index describes
        manifest = Manifest(manifest.root, manifest.data, allow_pipe=manifest.allow_pipe)
    from bcc.remote_secrets import quote_bytes

    location = remote.join(manifest.root, FILE)
    shown, how = remote.display(location), remote.kind(location)
    where = {"local": None, "http": f"put its {FILE} on the server beside manifest.json",
             "pipe": f"put its {FILE} beside manifest.json in the store the pipe: command reads (run with "
                     f"{{name}} = {FILE} it must print the file)"}[how]
    counts = {n: manifest.split(n).count for n in manifest.splits}
    try:
        raw = remote.read_bytes(location, retries, limit=32 * min(sum(counts.values()), MAX_SAMPLES) + (1 << 20),
                                timeout_s=timeout_s, what=f"the index of {sum(counts.values()):,} samples")
    except FileNotFoundError:
        return _absent(manifest, shown, f"it has no {FILE}", "", where)
    except remote.RemoteError as e:
        if e.missing:
            return _absent(manifest, shown, f"the server has no {FILE}", str(e), where)
        if how == "pipe":  # a command cannot say "not there" apart from "failed": an older pack's has none
            return _absent(manifest, shown, f"the pipe: command gives no {FILE}", f"it failed: {e}", where)
        raise SampleIndexError(f"{shown} cannot be read: {e}; {_FIX}") from None
    except OSError as e:
        raise SampleIndexError(f"{shown} cannot be read: {e.strerror or e}; {_FIX}") from None
    if not raw.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        page = raw.lstrip()[:1] == b"<"  # a server's page for a missing file (HTML, an S3 XML error)
        if how == "pipe" and (page or not raw):
            return _absent(manifest, shown, f"the pipe: command gives no {FILE}", f"it printed a web page, which "
                           f"begins {quote_bytes(raw[:100])}" if raw else "it printed nothing", where)
        if how == "http" and page:
            return _absent(manifest, shown, f"the server has no {FILE}", f"it sent a web page, which begins "
                           f"{quote_bytes(raw[:100])}", where)
        what = (f"not a zip file (it begins {quote_bytes(raw[:100])})" if raw else "empty (0 bytes)")
        raise SampleIndexError(f"{shown} is damaged: {what}; {_FIX}")
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


def picture_roots(hashes: Sequence[np.ndarray | None]) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    """Per set of pHashes (`hashes`: one per part, e.g. a pack's split; None for a part without them),
    each sample's picture group over all parts, at two radii: (the same picture, within
    `bcc.neardup.SAME_PICTURE_BITS`; near-identical, within `DEFAULT_THRESHOLD`), each as a group id per
    sample, equal ids meaning one group, across parts too. Hashes are joined as the packer joins them
    (chains too) over the distinct hashes: O(n) memory, no all-pairs comparison. The same-picture search
    runs only over the near groups that hold hashes of two parts (a pair within SAME_PICTURE_BITS lies in
    one near group), so it costs nothing where nothing is shared."""
    from bcc.neardup import DEFAULT_THRESHOLD, SAME_PICTURE_BITS, near_duplicate_roots

    distinct = [np.unique(h, return_inverse=True) if h is not None else None for h in hashes]
    values = [d[0] for d in distinct if d is not None]
    if not values:
        return [None] * len(hashes), [None] * len(hashes)
    every = np.concatenate(values)
    owner = np.concatenate([np.full(len(d[0]), i) for i, d in enumerate(distinct) if d is not None])
    near = near_duplicate_roots(every, DEFAULT_THRESHOLD)
    lowest, highest = np.full(len(every), len(hashes)), np.full(len(every), -1)
    np.minimum.at(lowest, near, owner)
    np.maximum.at(highest, near, owner)
    shared = np.flatnonzero(lowest[near] != highest[near])
    same = np.arange(len(every))
    same[shared] = shared[near_duplicate_roots(every[shared], SAME_PICTURE_BITS)]
    out: tuple[list, list] = ([], [])
    offset = 0
    for d in distinct:
        if d is None:
            out[0].append(None)
            out[1].append(None)
            continue
        at = offset + d[1].ravel()
        out[0].append(same[at])
        out[1].append(near[at])
        offset += len(d[0])
    return out


def _closest(hashes: np.ndarray, among: np.ndarray, to: np.uint64) -> tuple[int, int]:
    """(position, bits): the sample of `among` (positions into `hashes`) whose pHash is closest to `to`."""
    from bcc.neardup_search import popcount

    bits = popcount(hashes[among] ^ to)
    k = int(np.argmin(bits))
    return int(among[k]), int(bits[k])


def check_sources(sources: Sequence, splits: Mapping[str, str], mode: str = "error", *,
                  retries: int = remote.DEFAULT_RETRIES, timeout_s: float = remote.HTTP_TIMEOUT_S) -> list[str]:
    """Compare every two of `sources` (`bcc.sources.Source`: name, weight, manifest) over the splits a
    run reads (`splits`: config key -> split name; give the test split even when the run does not test
    at its end: a later `bcc eval` will). Raises SampleIndexError for images of one source's train split
    that another source's val or test split holds too (the file, or the same picture: pHashes within
    `bcc.neardup.SAME_PICTURE_BITS`, 4 of 64 bits, where re-encodes of one image were measured), counted
    per pair of splits, with one sample key of each side (`mode` "error"), or for an index that cannot be
    read or was lost. A near-identical picture there (5 to `DEFAULT_THRESHOLD`, 6 bits: one real pair of
    different fields was measured at 6) is a warning, counted and named likewise, never a refusal.
    Returns the lines to print, each starting "warning:" or "note:"."""
    from bcc.neardup import DEFAULT_THRESHOLD, SAME_PICTURE_BITS

    if mode == "ignore" or len(sources) < 2:
        return []
    train = splits.get("data.train_split")
    names = list(dict.fromkeys(splits.values()))
    lines: list[str] = []
    parts: list[_Part] = []
    for i, s in enumerate(sources):
        try:
            index = load(s.manifest, retries, timeout_s)
        except SampleIndexError as e:
            raise SampleIndexError(f"data.sources[{i}] {s.label}: {e}; {OPT_OUT}") from None
        if isinstance(index, str):
            lines.append(f"note: data.sources[{i}] {s.label}: {index}; until then images it shares with "
                         "another source are found only where whole shards repeat")
            continue
        stale = [n for n in names if n in index.stale and n in s.manifest.splits]
        if stale:
            lines.append(f"note: data.sources[{i}] {s.label}: {index.location} does not describe split(s) "
                         f"{', '.join(repr(n) for n in stale)} as the manifest lists them (edited since it was "
                         "packed, or an index of another pack); those are checked by shard only")
        parts += [_Part(i, n, index) for n in names if n in index.sha]
        if any(n not in index.columns["phash"] for n in names if n in index.sha):
            lines.append(f"note: data.sources[{i}] {s.label}: packed without pHashes (--no-near-dup): its "
                         "images are compared with the other sources' by file only, not by picture")
    roots = dict(zip(("same", "near"), picture_roots([p.index.columns["phash"].get(p.split) for p in parts]),
                     strict=True))
    leaks: dict[str, list] = {"same": [], "near": []}  # the same file or picture; a near-identical picture
    for t, pt in enumerate(parts):
        for o, po in enumerate(parts):
            if pt.source == po.source or pt.split != train or po.split == train:
                continue
            sha_t, sha_o = pt.index.sha[pt.split], po.index.sha[po.split]
            ph_t, ph_o = pt.index.columns["phash"].get(pt.split), po.index.columns["phash"].get(po.split)
            exact = np.isin(sha_o, sha_t)
            pictured = ph_t is not None and ph_o is not None
            hits = {"same": exact | (np.isin(roots["same"][o], roots["same"][t]) if pictured else False)}
            hits["near"] = (np.isin(roots["near"][o], roots["near"][t]) & ~hits["same"]) if pictured else exact & False
            for kind, hit in hits.items():
                if not hit.any():
                    continue
                first = int(np.flatnonzero(hit)[0])
                if exact[first]:
                    mate, bits = int(np.flatnonzero(sha_t == sha_o[first])[0]), None
                else:  # of the train samples in its group, the closest picture
                    mate, bits = _closest(ph_t, np.flatnonzero(roots[kind][t] == roots[kind][o][first]), ph_o[first])
                leaks[kind].append((int(hit.sum()), int((exact & hit).sum()), pt, po, mate, first, bits))

    def pairs(found: list) -> str:
        return "; ".join(f"{n} of {sources[po.source].label} split '{po.split}' in "
                         f"{sources[pt.source].label} split '{pt.split}' ("
                         + (f"{k} the same file; " if found is leaks["same"] else "")
                         + f"e.g. sample {_key(po.split, b)} and {_key(pt.split, a)}"
                         + (f", pHash {bits} bits apart" if bits is not None else "") + ")"
                         for n, k, pt, po, a, b, bits in found)

    fix = ("pack the overlapping folders together (one pack keeps copies and near-copies on one side), or set "
           "data.source_overlap=warn (train anyway) or ignore (no check)")
    if leaks["same"]:
        text = (f"data.sources: {sum(n for n, *_ in leaks['same'])} image(s) trained on in one source are evaluated "
                f"in another (the same file by sha256, or the same picture re-encoded: pHash within "
                f"{SAME_PICTURE_BITS} bits): {pairs(leaks['same'])}")
        if mode == "error":
            raise SampleIndexError(f"{text}. They would be trained on and scored; {fix}")
        lines.append(f"warning: {text}: their scores are flattered")
    if leaks["near"]:  # near is not the same: a warning to look at them, never a refusal
        lines.append(f"warning: data.sources: {sum(n for n, *_ in leaks['near'])} image(s) evaluated in one source "
                     f"have a near-identical picture (pHash {SAME_PICTURE_BITS + 1}-{DEFAULT_THRESHOLD} bits apart: "
                     f"different pictures can lie that close) trained on in another: {pairs(leaks['near'])}; if they "
                     f"are the same field re-shot, {fix.split(', or set')[0]}")
    for pt in parts:  # shared files that do not leak
        for po in parts:
            if pt.source >= po.source or (pt.split == train) != (po.split == train):
                continue
            common, ia, ib = np.intersect1d(pt.index.sha[pt.split], po.index.sha[po.split], return_indices=True)
            if not common.size:
                continue
            where = (f"{sources[pt.source].label} split '{pt.split}' and {sources[po.source].label} "
                     f"split '{po.split}' (e.g. sample {_key(pt.split, int(ia[0]))} and {_key(po.split, int(ib[0]))})")
            la, lb = pt.index.columns["label"].get(pt.split), po.index.columns["label"].get(po.split)
            other = int(np.count_nonzero(la[ia] != lb[ib])) if la is not None and lb is not None else 0
            what = ("read once per source each epoch" if pt.split == train
                    else f"scored twice in the combined '{pt.split}' metrics" if pt.split == po.split else "evaluated in both")
            lines.append(f"warning: data.sources: {common.size} image(s) are in both {where}: {what}; {other} of them "
                         "with another class in each source" if other else
                         f"note: data.sources: {common.size} image(s) are in both {where}: {what}")
    return lines
