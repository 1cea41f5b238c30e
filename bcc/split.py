"""The seeded, stratified train/val/test split of a packed dataset.

Samples are first joined into units that must not straddle splits: identical files (same sha256),
files whose names share a group id (`--group-regex`, e.g. a patient) and near-identical images (pHash
within a few bits, `bcc.neardup`), joined by one union-find (`bcc.neardup.UnionFind`). Units are
then dealt per class (a unit under its most common class), big units first, each to the split furthest
below its target, so the split is stratified and the fractions are met as closely as units allow. The
same samples and seed give the same split on every machine. `assign_folds` deals the same units into
k cross-validation folds the same way.
"""

from __future__ import annotations

import math
import random
import re
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from bcc.errors import BccError
from bcc.neardup import NearDuplicates, is_enabled, near_duplicate_edges

__all__ = ["GROUP_SCOPES", "SPLITS", "SplitError", "Units", "assign_folds", "assign_splits", "check_group_scope", "compile_group_regex", "deal_folds", "fold_warnings",
           "big_unit_warning", "connected_components", "deal_splits", "digest_ids", "join_units", "largest_remainder", "parse_split",
           "sample_units", "split_warnings"]

SPLITS = ("train", "val", "test")
TINY_SPLIT_PER_CLASS = 5  # a val/test split with fewer samples per class than this gets a warning


class SplitError(BccError):
    """Split fractions or a group regex that cannot be used."""


def parse_split(value: str | Sequence[float]) -> tuple[float, float, float]:
    """`"0.8,0.1,0.1"` or a 3-sequence -> validated (train, val, test) fractions."""
    if isinstance(value, str):
        try:
            parts = [float(p) for p in value.split(",")]
        except ValueError as e:
            raise SplitError(f"split must be three comma-separated numbers, got {value!r}") from e
    else:
        parts = [float(p) for p in value]
    if len(parts) != 3:
        raise SplitError(f"split needs three fractions (train,val,test), got {len(parts)}: {value!r}")
    if any(not math.isfinite(p) or p < 0 for p in parts):
        raise SplitError(f"split fractions must be non-negative, got {value!r}")
    if abs(sum(parts) - 1.0) > 1e-6:
        raise SplitError(f"split fractions must sum to 1, got {value!r} (sum {sum(parts):g})")
    if parts[0] <= 0:
        raise SplitError(f"the train fraction must be > 0, got {value!r}")
    return (parts[0], parts[1], parts[2])


GROUP_SCOPES = ("dataset", "class")


def check_group_scope(scope: str) -> None:
    """Raise SplitError unless `scope` is one of GROUP_SCOPES (see `join_units`)."""
    if scope not in GROUP_SCOPES:
        raise SplitError(f"group scope must be one of {', '.join(GROUP_SCOPES)}, got {scope!r}")


def compile_group_regex(pattern: str | None) -> re.Pattern | None:
    """Compile `--group-regex`; it must have a capturing group (the group id, e.g. a patient)."""
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise SplitError(f"group regex {pattern!r} does not compile: {e}") from e
    if rx.groups < 1:
        raise SplitError(f"group regex {pattern!r} needs a capturing group, e.g. '^(P\\d+)_'")
    return rx


def largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to `n`, as close to `n * fractions` as possible (Hamilton's method)."""
    quotas = [n * f for f in fractions]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


@dataclass(frozen=True)
class Units:
    """Sample sets that must not straddle splits or folds (see `sample_units`).

    members: the units, each a list of sample indices (ascending), ordered by smallest member.
    unmatched: file names the group regex did not match (each then is its own group).
    near: the near-duplicate groups found (`bcc.neardup.NearDuplicates`; empty when switched off).
    """

    members: list[list[int]]
    unmatched: int
    near: NearDuplicates


def digest_ids(digests: np.ndarray) -> np.ndarray:
    """One id per distinct digest: (n, 32) uint8 sha256 rows -> (n,) int64 ids 0..k-1, numbered in
    ascending byte order of the digests (the ids `np.unique(..., return_inverse=True)` gives over the
    rows as 32-byte voids). Sorted on the first 8 bytes; only rows whose first 8 bytes repeat (copies
    of one file, in practice) are ordered on the rest. A 200k-image pack's void `np.unique` took
    ~22 MiB of peak memory in sorted copies; this takes a few n-long int arrays."""
    n = len(digests)
    if not n:
        return np.zeros(0, dtype=np.int64)
    words = np.ascontiguousarray(digests, dtype=np.uint8).view(">u8")  # (n, 4): byte order = word order
    first = words[:, 0].astype(np.uint64)
    order = np.argsort(first, kind="stable")
    ranked = first[order]
    del first
    tied = np.flatnonzero(ranked[1:] == ranked[:-1])  # sorted positions equal to the next one
    new = np.ones(n, dtype=bool)
    if tied.size:
        # runs of equal first words: order each run on all four words, then mark where rows differ
        in_run = np.zeros(n, dtype=bool)  # sorted positions inside a run of equal first words
        in_run[tied] = in_run[tied + 1] = True
        positions = np.flatnonzero(in_run)
        rows = order[positions]
        sub = words[rows].astype(np.uint64)  # (r, 4): only the tied rows
        within = np.lexsort(sub.T[::-1])  # on all four words (the first keeps the runs in place)
        order[positions] = rows[within]
        sub = sub[within]
        same = (sub[1:] == sub[:-1]).all(axis=1)  # equal digests, hence neighbours in one run
        new[positions[1:][same]] = False
    new[0] = True
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids


def _exact_edges(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (first, other) joining samples with equal keys (e.g. sha256 ids), as int64 arrays."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    same = np.flatnonzero(sk[1:] == sk[:-1]) + 1  # sorted positions equal to the one before
    if not same.size:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    run_start = np.maximum.accumulate(np.where(np.r_[True, sk[1:] != sk[:-1]], np.arange(len(sk)), 0))
    return order[run_start[same]].astype(np.int64), order[same].astype(np.int64)


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per element of 0..n-1, the smallest element of its connected component under edges a-b.

    Numpy only (no scipy.sparse: its import is ~0.3 s of the packer's CPU, a tenth of a 20k-image
    pack's wall time on 2 cores): each round hooks the larger root of every edge under the smaller
    (`parent[i] <= i` always, so a component's root is its smallest element) and then halves paths
    until every element points at its root; rounds repeat until no edge joins two roots."""
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        if not apart.any():
            break
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]  # edges inside one root are done
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
    return parent


def _unit_count(root: np.ndarray) -> int:
    """Number of components in a `connected_components` result (elements that are their own root)."""
    return int(np.count_nonzero(root == np.arange(len(root))))


def join_units(exact_ids: np.ndarray, names: Iterable[str] | None = None, group_rx: re.Pattern | None = None,
               hashes: np.ndarray | None = None, near_threshold: int | None = None, group_scope: str = "dataset",
               mapper: Callable = map) -> tuple[np.ndarray, int, NearDuplicates]:
    """`sample_units` on arrays, for packs of millions of images (memory O(n) in numpy, no per-sample
    Python objects beyond the group regex's ids).

    exact_ids: (n,) ints, equal for identical files (e.g. the inverse of a sha256 `np.unique`).
    names: the samples' source paths (only read with `group_rx`); hashes: (n,) uint64 pHashes (only
    read when `near_threshold` is on). group_scope: "dataset" (one id joins files in any class folder,
    e.g. a patient's cells of several types) or "class" (ids are per class folder, the first part of a
    name: `EOSINOPHIL/_0_1.jpeg` and `MONOCYTE/_0_7.jpeg` are different sources). Returns (root,
    unmatched, near): root[i] is the smallest sample index of sample i's unit. `mapper`: a `map` for
    the near-duplicate search's table groups (the packer passes its process pool's).
    """
    check_group_scope(group_scope)
    n = len(exact_ids)
    a, b = _exact_edges(np.asarray(exact_ids))
    parts_a, parts_b = [a], [b]
    unmatched = 0
    if group_rx is not None:
        first_of: dict[str, int] = {}
        ga, gb = array("q"), array("q")
        for i, name in enumerate(names or ()):
            path = PurePosixPath(name)
            m = group_rx.search(path.name)
            if m and m.group(1) is not None:
                key = m.group(1) if group_scope == "dataset" else f"{path.parts[0]}/{m.group(1)}"
                j = first_of.setdefault(key, i)
                if j != i:
                    ga.append(j)
                    gb.append(i)
            else:
                unmatched += 1
        parts_a.append(np.frombuffer(ga, dtype=np.int64))
        parts_b.append(np.frombuffer(gb, dtype=np.int64))
    near = NearDuplicates((), 0)
    if is_enabled(near_threshold):
        units_before = _unit_count(connected_components(n, np.concatenate(parts_a), np.concatenate(parts_b)))
        na, nb, groups = near_duplicate_edges(hashes, near_threshold, exact_keys=exact_ids, mapper=mapper)
        parts_a.append(na)
        parts_b.append(nb)
        root = connected_components(n, np.concatenate(parts_a), np.concatenate(parts_b))
        merged = units_before - _unit_count(root)
        return root, unmatched, NearDuplicates(groups, merged)
    return connected_components(n, np.concatenate(parts_a), np.concatenate(parts_b)), unmatched, near


def sample_units(samples: Sequence[dict[str, Any]], group_rx: re.Pattern | None = None,
                 near_threshold: int | None = None) -> Units:
    """Join samples that must stay together: identical files (same `sha256`), names sharing the
    group regex's id, and (when `near_threshold` is a bit count, see `bcc.neardup.is_enabled`)
    near-identical images by their 64-bit `phash` (every sample needs one then)."""
    ids: dict[str, int] = {}
    exact = np.array([ids.setdefault(s["sha256"], len(ids)) for s in samples], dtype=np.int64)
    hashes = None
    if is_enabled(near_threshold):
        hashes = np.fromiter((s["phash"] for s in samples), dtype=np.uint64, count=len(samples))
    root, unmatched, near = join_units(exact, [s["source"] for s in samples], group_rx, hashes, near_threshold)
    return Units(_members(root), unmatched, near)


def _members(root: np.ndarray) -> list[list[int]]:
    units: dict[int, list[int]] = {}
    for i, r in enumerate(root.tolist()):
        units.setdefault(r, []).append(i)
    return list(units.values())


def _roots(units: Units, n: int) -> np.ndarray:
    root = np.arange(n, dtype=np.int64)
    for members in units.members:
        root[members] = min(members)
    return root


def _unit_classes(labels: np.ndarray, root: np.ndarray, units: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Class of each unit (`units`: roots): its members' most common label (ties: the lowest); a unit
    spanning classes (a cross-class duplicate or a patient in two folders) is stratified under it."""
    cls = labels[units].astype(np.int64)
    multi = np.flatnonzero(sizes > 1)
    if multi.size:
        position = {int(units[k]): int(k) for k in multi}
        votes: dict[int, Counter] = {}
        for i in np.flatnonzero(np.isin(root, units[multi])).tolist():
            votes.setdefault(int(root[i]), Counter())[int(labels[i])] += 1
        for r, v in votes.items():
            cls[position[r]] = min(v, key=lambda c: (-v[c], c))
    return cls


def _ordered_units(rng: random.Random, roots: np.ndarray, sizes: np.ndarray) -> tuple[list[int], list[int]]:
    """One class's units (ascending roots) in dealing order: seeded shuffle, then big units first
    (stable). Returns (roots, sizes) as lists in that order."""
    order = list(range(len(roots)))
    rng.shuffle(order)
    size_list = sizes.tolist()
    if any(x > 1 for x in size_list):
        order.sort(key=lambda k: -size_list[k])
    root_list = roots.tolist()
    return [root_list[k] for k in order], [size_list[k] for k in order]


def deal_splits(labels: np.ndarray, root: np.ndarray, fractions: Sequence[float], seed: int
                ) -> tuple[np.ndarray, random.Random]:
    """`assign_splits` on arrays: split index per sample (int8) and the seeded RNG after dealing."""
    n = len(labels)
    units = np.flatnonzero(root == np.arange(n))
    sizes = np.bincount(root, minlength=n)[units]
    cls = _unit_classes(np.asarray(labels), root, units, sizes)
    rng = random.Random(seed)
    unit_split = np.zeros(n, dtype=np.int8)
    allowed = [k for k, f in enumerate(fractions) if f > 0]
    for c in np.unique(cls).tolist():
        pick = cls == c
        roots, cls_sizes = _ordered_units(rng, units[pick], sizes[pick])
        # each unit to the split furthest below its target (ties: the larger fraction, then the first)
        deficit = np.array(largest_remainder(sum(cls_sizes), fractions), dtype=np.int64)
        unit_split[np.array(roots, dtype=np.int64)] = _deal(cls_sizes, allowed, -deficit, -np.array(fractions))
    return unit_split[root], rng


def _deal(sizes: list[int], bins: list[int], level: np.ndarray, tie: np.ndarray, other: np.ndarray | None = None
          ) -> np.ndarray:
    """The greedy deal, unit by unit in the order given: each unit goes to the bin k (of `bins`) with the
    smallest (level[k], other[k], tie[k], k), whose level (and other) then grow by the unit's size;
    `level` (and `other`) are updated in place. Returns the bin per unit.

    Done per run of equal-sized units (the dealing order puts them together) without a Python step per
    unit: bin k's successive keys (level[k] + j * size, ...) rise with j, so the greedy's picks are the
    first m keys of all bins' keys merged in order (as in a merge of sorted lists), one lexsort a run."""
    sizes = np.asarray(sizes, dtype=np.int64)
    out = np.empty(len(sizes), dtype=np.int64)
    if not len(sizes):
        return out
    bins = np.asarray(bins, dtype=np.int64)
    edges = np.flatnonzero(np.r_[True, sizes[1:] != sizes[:-1], True])
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        m, size = hi - lo, int(sizes[lo])
        k = np.repeat(bins, m)
        step = np.tile(np.arange(m, dtype=np.int64) * size, len(bins))
        keys = (k, tie[k], level[k] + step) if other is None else (k, tie[k], other[k] + step, level[k] + step)
        picks = k[np.lexsort(keys)[:m]]
        out[lo:hi] = picks
        grown = np.bincount(picks, minlength=len(level)) * size
        level += grown
        if other is not None:
            other += grown
    return out


def assign_splits(samples: list[dict[str, Any]], fractions: Sequence[float], seed: int,
                  group_rx: re.Pattern | None, *, units: Units | None = None) -> tuple[list[int], int, random.Random]:
    """Split index (into `SPLITS`) per sample, from each sample's `sha256`, `source` and `label`.

    units: precomputed `sample_units` (e.g. with near-duplicates joined); default: exact duplicates
    and `group_rx` only. Returns (assignment, file names the group regex did not match, the seeded
    RNG in the state the packer continues with for its shuffles).
    """
    if units is None:
        units = sample_units(samples, group_rx)
    labels = np.array([s["label"] for s in samples], dtype=np.int64)
    assignment, rng = deal_splits(labels, _roots(units, len(samples)), fractions, seed)
    return assignment.tolist(), units.unmatched, rng


def deal_folds(labels: np.ndarray, root: np.ndarray, folds: int, seed: int,
               include: np.ndarray | None = None) -> np.ndarray:
    """`assign_folds` on arrays: fold id per sample (int16), -1 where `include` is False."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise SplitError(f"folds must be an integer >= 2, got {folds!r}")
    n = len(labels)
    include = np.ones(n, dtype=bool) if include is None else np.asarray(include, dtype=bool)
    units = np.flatnonzero(root == np.arange(n))
    sizes = np.bincount(root, minlength=n)[units]
    inside = np.bincount(root, weights=include, minlength=n)[units].astype(np.int64)
    torn = np.flatnonzero((inside > 0) & (inside < sizes))
    if torn.size:
        members = np.flatnonzero(root == units[torn[0]]).tolist()
        raise SplitError(f"samples {members} must stay together but only some of them take part in the folds")
    chosen = inside == sizes
    units, sizes = units[chosen], sizes[chosen]
    if int(sizes.sum()) < folds:
        raise SplitError(f"{int(sizes.sum())} train+val samples cannot fill {folds} folds")
    cls = _unit_classes(np.asarray(labels), root, units, sizes)
    rng = random.Random(f"bcc-folds:{seed}")  # its own stream: folds do not shift the split or shuffles
    unit_fold = np.full(n, -1, dtype=np.int16)
    total = np.zeros(folds, dtype=np.int64)
    for c in np.unique(cls).tolist():
        pick = cls == c
        roots, cls_sizes = _ordered_units(rng, units[pick], sizes[pick])
        # each unit to the fold with the fewest of this class (ties: the fewest in all, then the first)
        filled = np.zeros(folds, dtype=np.int64)
        unit_fold[np.array(roots, dtype=np.int64)] = _deal(cls_sizes, list(range(folds)), filled,
                                                           np.zeros(folds, dtype=np.int64), other=total)
    return np.where(include, unit_fold[root], -1).astype(np.int16)


def assign_folds(samples: Sequence[dict[str, Any]], units: Units, folds: int, seed: int,
                 include: Sequence[bool] | None = None) -> list[int | None]:
    """Fold id (0..folds-1) per sample for k-fold cross-validation; None where `include` is False.

    include: which samples take part (the packer passes train+val, so the test split stays fixed);
    a unit must lie wholly inside or outside it (true of units the split kept together).
    Stratified like the split: per class (a unit under its most common class), units in seeded order,
    big units first, each to the fold holding the fewest samples of that class (ties: fewest in all,
    then the lowest fold). With single-sample units every class is balanced within +-1 per fold; a
    group is never divided. The same samples and seed give the same folds.
    """
    labels = np.array([s["label"] for s in samples], dtype=np.int64)
    fold = deal_folds(labels, _roots(units, len(samples)), folds, seed,
                      None if include is None else np.array(list(include), dtype=bool))
    return [None if f < 0 else f for f in fold.tolist()]


def fold_warnings(class_counts: Sequence[Mapping[str, int]]) -> list[str]:
    """One warning naming the classes of train+val that some folds lack (per fold `{class: count}`, as
    the manifest's `folds.class_counts`): a class with fewer groups than folds cannot reach them all, so
    those folds validate without it. Empty when every fold holds every class present."""
    k = len(class_counts)
    empty = [i for i, f in enumerate(class_counts) if not any(f.values())]
    if empty:  # data.fold=i would validate on nothing: the run refuses it (bcc.train.preflight)
        return [f"{len(empty)} of the {k} folds are empty (fold {', '.join(map(str, empty[:5]))}"
                f"{', ...' if len(empty) > 5 else ''}): train+val holds fewer groups than folds; use fewer folds"]
    present = [c for c in (class_counts[0] if k else {}) if any(f.get(c, 0) for f in class_counts)]
    short = {c: sum(1 for f in class_counts if f.get(c, 0)) for c in present}
    short = {c: n for c, n in short.items() if n < k}
    if not short:
        return []
    names = ", ".join(f"{c!r} (in {n})" for c, n in short.items())
    return [f"{len(short)} class(es) are missing from some of the {k} folds: {names}; they have fewer "
            "groups in train+val than folds, so those folds validate without them (use fewer folds)"]


def big_unit_warning(unit_root: np.ndarray, fractions, near_threshold: int | None, grouped: bool) -> list[str]:
    """A warning when one unit (samples joined by exact copies, the group regex and near-duplicates, which
    chain: A~B and B~C join A and C) outgrows the smallest non-empty split, which then cannot get its share."""
    sizes = np.bincount(unit_root)
    big = int(sizes.max()) if sizes.size else 0
    smallest = min((f for f in fractions if f > 0), default=1.0) * len(unit_root)
    if big <= max(1.0, 0.5 * smallest):
        return []
    causes = ["exact copies"] + (["--group-regex ids"] if grouped else [])
    hint = ""
    if near_threshold is not None:
        causes.append(f"near-duplicates within {near_threshold} bits (they chain)")
        hint = "; if the images look alike overall, lower --near-dup-threshold or pass --no-near-dup"
    return [f"one group of {big} samples ({big / len(unit_root):.0%} of the images) joined by {', '.join(causes)} "
            f"must stay in one split: the split fractions cannot be met{hint}"]


def split_warnings(splits_info: dict[str, Any], num_classes: int) -> list[str]:
    """Warnings for evaluation splits too small to choose a checkpoint on (counted and named)."""
    out = []
    tiny = TINY_SPLIT_PER_CLASS * num_classes
    for name in SPLITS[1:]:
        n = splits_info[name]["count"]
        if n == 0:
            out.append(f"split {name!r} is empty" + (": training refuses an empty val split" if name == "val"
                                                     else ": a run reports no test metrics"))
        elif n < tiny:
            out.append(f"split {name!r} has only {n} sample(s) (fewer than {TINY_SPLIT_PER_CLASS} per class): "
                       "its metrics will be noisy")
    return out
