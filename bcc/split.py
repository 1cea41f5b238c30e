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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcc.errors import BccError
from bcc.neardup import NearDuplicates, UnionFind, is_enabled, join_near_duplicates

__all__ = ["SPLITS", "SplitError", "Units", "assign_folds", "assign_splits", "compile_group_regex",
           "largest_remainder", "parse_split", "sample_units"]

SPLITS = ("train", "val", "test")


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


def sample_units(samples: Sequence[dict[str, Any]], group_rx: re.Pattern | None = None,
                 near_threshold: int | None = None) -> Units:
    """Join samples that must stay together: identical files (same `sha256`), names sharing the
    group regex's id, and (when `near_threshold` is a bit count, see `bcc.neardup.is_enabled`)
    near-identical images by their 64-bit `phash` (every sample needs one then)."""
    uf = UnionFind(len(samples))
    first_of: dict[tuple[str, str], int] = {}
    unmatched = 0
    for i, s in enumerate(samples):
        keys = [("sha", s["sha256"])]
        if group_rx is not None:
            m = group_rx.search(Path(s["source"]).name)
            if m and m.group(1) is not None:
                keys.append(("group", m.group(1)))
            else:
                unmatched += 1
        for key in keys:
            j = first_of.setdefault(key, i)
            if j != i:
                uf.union(j, i)
    near = NearDuplicates((), 0)
    if is_enabled(near_threshold):
        hashes = [s["phash"] for s in samples]
        near = join_near_duplicates(uf, hashes, near_threshold, exact_keys=[s["sha256"] for s in samples])
    units: dict[int, list[int]] = {}
    for i in range(len(samples)):
        units.setdefault(uf.find(i), []).append(i)
    return Units(list(units.values()), unmatched, near)


def _by_class(samples: Sequence[dict[str, Any]], units: Sequence[list[int]]) -> dict[int, list[list[int]]]:
    # a unit spanning classes (a cross-class duplicate or a patient in two folders) is stratified
    # under its most common class
    by_class: dict[int, list[list[int]]] = {}
    for members in units:
        votes = Counter(samples[i]["label"] for i in members)
        cls = min(votes, key=lambda c: (-votes[c], c))
        by_class.setdefault(cls, []).append(members)
    return by_class


def assign_splits(samples: list[dict[str, Any]], fractions: Sequence[float], seed: int,
                  group_rx: re.Pattern | None, *, units: Units | None = None) -> tuple[list[int], int, random.Random]:
    """Split index (into `SPLITS`) per sample, from each sample's `sha256`, `source` and `label`.

    units: precomputed `sample_units` (e.g. with near-duplicates joined); default: exact duplicates
    and `group_rx` only. Returns (assignment, file names the group regex did not match, the seeded
    RNG in the state the packer continues with for its shuffles).
    """
    if units is None:
        units = sample_units(samples, group_rx)
    by_class = _by_class(samples, units.members)
    rng = random.Random(seed)
    assignment = [0] * len(samples)
    for cls in sorted(by_class):
        cls_units = sorted(by_class[cls], key=lambda m: m[0])
        rng.shuffle(cls_units)
        cls_units.sort(key=len, reverse=True)  # big units first; singletons then fill targets exactly
        targets = largest_remainder(sum(len(u) for u in cls_units), fractions)
        filled = [0, 0, 0]
        allowed = [k for k, f in enumerate(fractions) if f > 0]
        for members in cls_units:
            k = max(allowed, key=lambda k: (targets[k] - filled[k], fractions[k], -k))
            filled[k] += len(members)
            for i in members:
                assignment[i] = k
    return assignment, units.unmatched, rng


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
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise SplitError(f"folds must be an integer >= 2, got {folds!r}")
    include = [True] * len(samples) if include is None else list(include)
    chosen = []
    for members in units.members:
        inside = {include[i] for i in members}
        if len(inside) > 1:
            raise SplitError(f"samples {members} must stay together but only some of them take part in the folds")
        if inside == {True}:
            chosen.append(members)
    if sum(len(u) for u in chosen) < folds:
        raise SplitError(f"{sum(len(u) for u in chosen)} train+val samples cannot fill {folds} folds")
    rng = random.Random(f"bcc-folds:{seed}")  # its own stream: folds do not shift the split or shuffles
    fold_of: list[int | None] = [None] * len(samples)
    total = [0] * folds
    for _cls, cls_units in sorted(_by_class(samples, chosen).items()):
        cls_units = sorted(cls_units, key=lambda m: m[0])
        rng.shuffle(cls_units)
        cls_units.sort(key=len, reverse=True)
        filled = [0] * folds
        for members in cls_units:
            k = min(range(folds), key=lambda k: (filled[k], total[k], k))
            filled[k] += len(members)
            total[k] += len(members)
            for i in members:
                fold_of[i] = k
    return fold_of
