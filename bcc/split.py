"""The seeded, stratified train/val/test split of a packed dataset.

Samples are first joined into units that must not straddle splits: identical files (same sha256) and
files whose names share a group id (`--group-regex`, e.g. a patient), joined by union-find. Units are
then dealt per class (a unit under its most common class), big units first, each to the split furthest
below its target, so the split is stratified and the fractions are met as closely as units allow. The
same samples and seed give the same split on every machine.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bcc.errors import BccError

__all__ = ["SPLITS", "SplitError", "assign_splits", "compile_group_regex", "largest_remainder", "parse_split"]

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


def _units(samples: list[dict[str, Any]], group_rx: re.Pattern | None) -> tuple[list[list[int]], int]:
    """Union-find over duplicates and regex groups -> (units of sample indices, names the regex missed)."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

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
            if key in first_of:
                union(first_of[key], i)
            else:
                first_of[key] = i

    units: dict[int, list[int]] = {}
    for i in range(len(samples)):
        units.setdefault(find(i), []).append(i)
    return list(units.values()), unmatched


def assign_splits(samples: list[dict[str, Any]], fractions: Sequence[float], seed: int,
                  group_rx: re.Pattern | None) -> tuple[list[int], int, random.Random]:
    """Split index (into `SPLITS`) per sample, from each sample's `sha256`, `source` and `label`.

    Returns (assignment, file names the group regex did not match, the seeded RNG in the state the
    packer continues with for its shuffles).
    """
    units, unmatched = _units(samples, group_rx)
    # a unit spanning classes (a cross-class duplicate or a patient in two folders) is stratified
    # under its most common class
    by_class: dict[int, list[list[int]]] = {}
    for members in units:
        votes = Counter(samples[i]["label"] for i in members)
        cls = min(votes, key=lambda c: (-votes[c], c))
        by_class.setdefault(cls, []).append(members)

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
    return assignment, unmatched, rng
