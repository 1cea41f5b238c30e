"""The Hamming-radius search behind `bcc.neardup`: multi-index hashing over distinct 64-bit hashes.

Two searches share the tables (see `bcc.neardup`'s docstring for the method and its references):

- `distinct_pairs`: every pair within d bits, each once (what `bcc.neardup.near_pairs` lists). Its
  output, and the candidates it compares, grow as the square of a cluster of distinct-but-close hashes
  (k such hashes give up to k(k-1)/2 pairs): a reference and a report tool, not the packer's path.
- `distinct_components`: only the connected components of the within-d graph, which is all a split
  needs. It unions as it searches and never lists pairs: a bucket whose hashes are already one
  component is skipped, small buckets are compared pairwise (vectorised, at most `BIG_BUCKET`^2 / 2
  each), and a large bucket (a dense cluster: thousands of near-blank images within a few bits of one
  another) is settled by pivots: each pivot is compared with the bucket's pending hashes of OTHER
  components only, joins those within d, and is then done; the bucket is finished as soon as all its
  pending hashes are in one component. Exact (the same components as all pairs within d), with O(n)
  memory; a dense cluster costs about (pivots x bucket) comparisons, where pivots is a dominating set
  of the bucket's graph (tens to hundreds), not bucket^2 / 2. What stays quadratic is a large bucket
  of many hashes that never connect (k far-apart hashes agreeing on one table's key bits: k^2 / 2
  comparisons, as in the pair search).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

HASH_BITS = 64

# cost model of one table, in nanoseconds per distinct hash (mask, argsort, run bookkeeping) and per
# candidate pair (gather, xor, popcount); measured on one core with numpy 2 and only their ratio matters
_NS_PER_HASH = 150.0
_NS_PER_CANDIDATE = 40.0


if hasattr(np, "bitwise_count"):  # numpy >= 2.0

    def popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)  # uint8

else:  # pragma: no cover - numpy 1.x
    _BYTE_COUNTS = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)

    def popcount(x: np.ndarray) -> np.ndarray:
        return _BYTE_COUNTS[x.reshape(-1, 1).view(np.uint8)].sum(axis=1)


# ---- the index --------------------------------------------------------------------------------
def _block_masks(m: int) -> list[int]:
    """m contiguous blocks covering 64 bits, widths differing by at most 1."""
    edges = [round(k * HASH_BITS / m) for k in range(m + 1)]
    return [((1 << (hi - lo)) - 1) << lo for lo, hi in itertools.pairwise(edges)]


def _choose_blocks(n: int, d: int) -> int:
    """Number of blocks m minimising the cost model for n distinct hashes at radius d."""
    best_m, best_cost = d + 1, math.inf
    for m in range(d + 1, min(HASH_BITS, 3 * d + 8) + 1):
        key_bits = HASH_BITS * (m - d) / m
        tables = math.comb(m, d)
        cost = tables * (n * _NS_PER_HASH + n * n / 2 ** (key_bits + 1) * _NS_PER_CANDIDATE)
        if cost < best_cost:
            best_m, best_cost = m, cost
    return best_m


_BLOCK = 1 << 16  # hashes keyed, or sorted positions compared, at once


def _table_key(uh: np.ndarray, masks: list[int]) -> np.ndarray:
    """The bits of `uh` under the (disjoint, contiguous) block masks, packed low to high into the
    narrowest unsigned type: ordered exactly as `uh & sum(masks)`, but 16-bit keys (two 8-bit blocks
    of 8, the usual table at d = 6) take numpy's radix sort, ~20x faster than sorting uint64."""
    bits = sum(mask.bit_count() for mask in masks)
    if bits > 32:
        return uh & np.uint64(sum(masks))
    key = np.empty(len(uh), dtype=np.uint16 if bits <= 16 else np.uint32)
    for lo in range(0, len(uh), _BLOCK):  # in blocks: no n-long uint64 temporaries
        block = uh[lo:lo + _BLOCK]
        packed = np.zeros(len(block), dtype=np.uint64)
        shift = 0
        for mask in sorted(masks):
            low = (mask & -mask).bit_length() - 1
            packed |= ((block >> np.uint64(low)) & np.uint64(mask >> low)) << np.uint64(shift)
            shift += mask.bit_count()
        key[lo:lo + _BLOCK] = packed
    return key


def distinct_pairs(uh: np.ndarray, d: int, stats: dict | None = None, mapper: Callable = map) -> np.ndarray:
    """All (a, b, dist) with a < b, indices into the distinct hashes `uh`, dist <= d; each pair once.
    The tables are searched in a few groups through `mapper` (`map`, or a process pool's: tables are
    independent, and the pairs are sorted at the end, so the result does not depend on it)."""
    n = len(uh)
    m = _choose_blocks(n, d)
    tables = list(itertools.combinations(range(m), m - d))
    groups = [tables[k::4] for k in range(min(4, len(tables)))]
    found, candidates = [], 0
    for pairs, count in mapper(_table_pairs, [(uh, d, m, group) for group in groups]):
        found.append(pairs)
        candidates += count
    if stats is not None:
        stats.update(blocks=m, tables=len(tables), candidates=candidates, distinct=n)
    pairs = np.concatenate(found).astype(np.int64) if found else np.zeros((0, 3), dtype=np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _table_pairs(task: tuple[np.ndarray, int, int, list[tuple[int, ...]]]) -> tuple[np.ndarray, int]:
    """The pairs (a, b, dist) that the given tables of m blocks report, and how many pairs they compared."""
    uh, d, m, tables = task
    n = len(uh)
    # positions as int32 below 2**31 hashes: half the memory of the n-long position arrays
    position = np.int32 if n < 2**31 else np.int64
    masks = _block_masks(m)
    found: list[np.ndarray] = [np.zeros((0, 3), dtype=np.int64)]
    candidates = 0
    for chosen in tables:
        key = _table_key(uh, [masks[b] for b in chosen])
        order = np.argsort(key, kind="stable").astype(position)
        sk = key[order]
        del key  # peak memory: a handful of n-long arrays per table, freed as soon as possible
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]]).astype(position)
        del sk
        lengths = np.diff(np.r_[starts, position(n)])
        active = np.flatnonzero(np.repeat(lengths, lengths) > 1).astype(position)  # in buckets of 2+
        ends = np.repeat(starts + lengths, lengths)[active]
        del starts, lengths
        # a pair agreeing on an earlier block outside `chosen` belongs to an earlier table
        earlier = [np.uint64(masks[b]) for b in range(chosen[-1]) if b not in chosen]
        for lo in range(0, active.size, _BLOCK):  # in blocks: the pair arrays stay small
            candidates += _bucket_pairs(uh, order, active[lo:lo + _BLOCK], ends[lo:lo + _BLOCK], d, earlier, found)
    return np.concatenate(found).astype(np.int64), candidates


def _bucket_pairs(uh: np.ndarray, order: np.ndarray, active: np.ndarray, ends: np.ndarray, d: int,
                  earlier: list[np.uint64], found: list[np.ndarray]) -> int:
    """Compare each sorted position in `active` with the later positions of its bucket (`ends`: one
    past the bucket's last), appending (a, b, dist) rows within `d` bits that no earlier table
    reports to `found`. Returns the number of pairs compared."""
    candidates, k = 0, 1
    while active.size:
        keep = ends - active > k
        active, ends = active[keep], ends[keep]
        if not active.size:
            break
        left, right = order[active], order[active + k]
        x = uh[left] ^ uh[right]
        dist = popcount(x)
        ok = np.flatnonzero(dist <= d)  # few: the earlier-table test runs on these only
        candidates += int(active.size)
        for mask in earlier:
            ok = ok[(x[ok] & mask) != 0]
        if ok.size:
            a, b = left[ok], right[ok]
            found.append(np.stack([np.minimum(a, b), np.maximum(a, b), dist[ok].astype(np.int64)], axis=1))
        k += 1
    return candidates




# ---- components without pairs -----------------------------------------------------------------
BIG_BUCKET = 256  # buckets larger than this are settled by pivots, smaller ones pairwise (measured crossover)


def distinct_components(uh: np.ndarray, d: int, stats: dict | None = None, mapper: Callable = map) -> np.ndarray:
    """Per distinct hash of `uh` (n uint64, no repeats), the smallest index of its connected component
    in the graph of pairs within `d` bits: an (n,) int64 array, root[i] <= i. Exact, O(n) memory, no
    pair list. The tables run in groups through `mapper` when it is not the builtin `map` (a process
    pool's: each group returns its own components, merged here); with `map` one pass over all tables
    lets later tables skip what earlier ones joined. `stats` receives blocks, tables, candidates
    (hash comparisons), pivots and distinct."""
    n = len(uh)
    m = _choose_blocks(n, d)
    tables = list(itertools.combinations(range(m), m - d))
    k = 1 if mapper is map else min(4, len(tables))
    parent, candidates, pivots = None, 0, 0
    for root, count, piv in mapper(_table_components, [(uh, d, m, tables[j::k]) for j in range(k)]):
        candidates, pivots = candidates + count, pivots + piv
        if parent is None:
            parent = root.astype(np.int64)
        else:
            moved = np.flatnonzero(root != np.arange(n))
            _union(parent, moved, root[moved].astype(np.int64))
    if parent is None:
        parent = np.arange(n, dtype=np.int64)
    if stats is not None:
        stats.update(blocks=m, tables=len(tables), candidates=candidates, pivots=pivots, distinct=n)
    return _find(parent, np.arange(n))


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of the elements `x` under `parent` (parent[i] <= i; a root points at itself), compressing
    their paths."""
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            break
        r = up
    parent[x] = r
    return r


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of a[k] and b[k] for every k: each round hooks the larger root of each edge that
    still joins two roots under the smaller, so a set's root stays its smallest element."""
    while a.size:
        ra, rb = _find(parent, a), _find(parent, b)
        apart = ra != rb
        if not apart.any():
            return
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def _table_components(task: tuple[np.ndarray, int, int, list[tuple[int, ...]]]) -> tuple[np.ndarray, int, int]:
    """The components that the given tables' buckets join: (root per distinct hash, comparisons, pivots)."""
    uh, d, m, tables = task
    n = len(uh)
    position = np.int32 if n < 2**31 else np.int64
    parent = np.arange(n, dtype=position)
    masks = _block_masks(m)
    candidates = pivots = 0
    for chosen in tables:
        key = _table_key(uh, [masks[b] for b in chosen])
        order = np.argsort(key, kind="stable").astype(position)
        sk = key[order]
        del key
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]]).astype(position)
        del sk
        lengths = np.diff(np.r_[starts, position(n)])
        multi = lengths > 1
        starts, lengths = starts[multi], lengths[multi]
        if not starts.size:
            continue
        # buckets whose hashes are already one component need no comparison at all
        offsets = np.r_[0, np.cumsum(lengths)[:-1]]
        active = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()), dtype=position)
        roots = _find(parent, order[active])
        split = np.minimum.reduceat(roots, offsets) != np.maximum.reduceat(roots, offsets)
        del roots, active
        small = split & (lengths <= BIG_BUCKET)
        s_starts, s_lengths = starts[small], lengths[small]
        active = (np.repeat(s_starts - np.r_[0, np.cumsum(s_lengths)[:-1]], s_lengths)
                  + np.arange(int(s_lengths.sum()), dtype=position)).astype(position)
        ends = np.repeat(s_starts + s_lengths, s_lengths)
        for lo in range(0, active.size, _BLOCK):
            found: list[np.ndarray] = []
            candidates += _bucket_pairs(uh, order, active[lo:lo + _BLOCK], ends[lo:lo + _BLOCK], d, [], found)
            if found:
                pairs = np.concatenate(found)
                _union(parent, pairs[:, 0].astype(position), pairs[:, 1].astype(position))
        for s, length in zip(starts[split & ~small].tolist(), lengths[split & ~small].tolist(), strict=True):
            count, piv = _pivot_bucket(uh, order[s:s + length], d, parent)
            candidates, pivots = candidates + count, pivots + piv
    return _find(parent, np.arange(n, dtype=position)), candidates, pivots


def majority(hs: np.ndarray) -> np.uint64:
    """The bitwise majority of the hashes `hs` (a centre: dense clusters gather around it)."""
    ones = np.zeros(HASH_BITS, dtype=np.int64)
    for bit in range(HASH_BITS):
        ones[bit] = np.count_nonzero(hs & np.uint64(1 << bit))
    return np.uint64(sum(1 << bit for bit in range(HASH_BITS) if 2 * ones[bit] > len(hs)))


def _pivot_bucket(uh: np.ndarray, members: np.ndarray, d: int, parent: np.ndarray) -> tuple[int, int]:
    """Settle one large bucket (`members`: distinct-hash indices agreeing on a table's key) in `parent`.

    Every pending member starts with its component's root as label. While the pending members hold
    more than one label, a pivot (the pending member nearest the bucket's majority hash outside the
    largest label) is compared with the pending members of other labels, the labels of those within
    `d` bits merge with its own (one edge per label joined), and the pivot leaves the pending set.
    Exact: a pair within d either had one side as a pivot while the other was pending (compared,
    unless already one component) or ends pending under the one label left. Returns (comparisons,
    pivots)."""
    lab = _find(parent, members)
    if (lab == lab[0]).all():
        return 0, 0
    hs = uh[members]
    near_centre = np.argsort(popcount(hs ^ majority(hs)), kind="stable")
    members, hs, lab = members[near_centre], hs[near_centre], lab[near_centre].astype(np.int64)
    values, counts = np.unique(lab, return_counts=True)
    dom, dom_size = int(values[counts.argmax()]), int(counts.max())
    edges_a: list[np.ndarray] = []
    edges_b: list[np.ndarray] = []
    candidates = pivots = 0
    while True:
        other = np.flatnonzero(lab != dom)
        if not other.size:
            break
        p = int(other[0])
        own = int(lab[p])
        idx = np.flatnonzero(lab != own)
        near = idx[popcount(hs[idx] ^ hs[p]) <= d]
        candidates, pivots = candidates + idx.size, pivots + 1
        if near.size:
            labels, first = np.unique(lab[near], return_index=True)
            edges_a.append(np.full(len(labels), members[p]))
            edges_b.append(members[near[first]])
            new = min(own, int(labels[0]))
            joined = np.isin(lab, labels) | (lab == own)
            lab[joined] = new
            size = int(np.count_nonzero(joined))
            if dom == own or dom in labels.tolist() or size > dom_size:  # the largest label, as far as known
                dom, dom_size = new, size
            own = new
        if own == dom:
            dom_size -= 1
        members, hs, lab = np.delete(members, p), np.delete(hs, p), np.delete(lab, p)
    if edges_a:
        _union(parent, np.concatenate(edges_a).astype(parent.dtype), np.concatenate(edges_b).astype(parent.dtype))
    return candidates, pivots
