"""Brace lists of shard names (`train-{000000..000127}.tar`, `{a,b}`): counted from the pattern without
expanding it, and expanded (braceexpand, webdataset's own dependency). What a location is, and which
may hold a brace list, is `bcc.remote`'s, which re-exports these."""

from __future__ import annotations

import re

from bcc.remote_secrets import redact

__all__ = ["count_bound", "expand"]

_RANGE = re.compile(r"\{(-?\d+|[A-Za-z])\.\.(-?\d+|[A-Za-z])(?:\.\.(-?\d+))?\}")


def count_bound(pattern: str) -> int:
    """How many names a brace pattern stands for, counted from the pattern (nothing expanded, so
    `{0..99999999}` costs nothing): a range counts its length, a list `{a,b}` the sum of its alternatives,
    parts side by side multiply (`x{0{0..9},1{0..5}}`: 16). Exact for what braceexpand expands; an
    unbalanced brace is a literal character, as there."""
    return _count_sequence(pattern, 0, inside=False)[0]


def _count_sequence(pattern: str, i: int, inside: bool) -> tuple[int, int]:
    """(names, index where it stops) of the parts from `i` on, up to the end or, `inside` a list, its next
    top-level `,` or `}`."""
    total = 1
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":  # an escaped character is a literal one
            i += 2
            continue
        if inside and c in ",}":
            break
        if c == "{":
            if m := _RANGE.match(pattern, i):
                a, b, step = m.group(1), m.group(2), abs(int(m.group(3) or 1)) or 1
                numeric = a.lstrip("-").isdigit() and b.lstrip("-").isdigit()
                lo, hi = (int(a), int(b)) if numeric else (ord(a[0]), ord(b[0]))
                total *= abs(hi - lo) // step + 1
                i = m.end()
                continue
            names, end = _count_list(pattern, i + 1)
            if end is not None:
                total *= names
                i = end
                continue
        i += 1  # a literal character (an unbalanced `{` too)
    return total, i


def _count_list(pattern: str, i: int) -> tuple[int, int | None]:
    """(names, index after its `}`) of the list whose `{` was at i - 1; (0, None) when it never closes."""
    names = 0
    while True:
        count, i = _count_sequence(pattern, i, inside=True)
        names += count
        if i >= len(pattern):
            return 0, None
        if pattern[i] == "}":
            return names, i + 1
        i += 1  # past a comma


def expand(pattern: str, limit: int | None = None) -> list[str]:
    """A brace list as the names it stands for, in order (`a-{000..002}.tar` -> a-000, a-001, a-002;
    `{x,y}` alternatives too; braceexpand, webdataset's own dependency). A `{name}` placeholder (no
    comma, no `..`) stays as it is. `limit`: a pattern that may stand for more names raises RemoteError
    before anything is expanded (braceexpand builds a range whole: `{0..99999999}` took 7 GB)."""
    from braceexpand import braceexpand

    from bcc.remote import RemoteError  # here: bcc.remote imports this module

    if limit is not None and count_bound(pattern) > limit:
        raise RemoteError(f"the brace list {redact(pattern)!r} names more than {limit:,} shards")
    return list(braceexpand(pattern))
