"""Near-duplicate images: 64-bit perceptual hashes, all pairs within a Hamming radius, and their groups.

Exact copies share a sha256; near copies (the same smear field re-shot, re-encoded or lightly resized)
do not, but their perceptual hashes differ in a few bits. Such pairs must stay on one side of a split,
so the packer hashes every source image (`phash`), finds every pair of hashes within `threshold` bits
(`near_pairs`, default 6 of 64) and joins them into the split's groups (`join_near_duplicates` on a
`UnionFind` that already holds the exact-duplicate and `--group-regex` unions, or `merge_labels` on
existing group labels); `near_duplicate_groups` gives the groups for the manifest report.

The pair search never compares all pairs. It is multi-index hashing with the generalised pigeonhole
principle: cut the 64 bits into m >= d + 1 blocks; two hashes within distance d differ in at most d
blocks, so they agree exactly on at least m - d of them. One table per choice of m - d blocks buckets
the hashes by those blocks (a sort), only hashes in one bucket are compared, and a pair is reported
by the first table (lexicographic) whose blocks it agrees on, so exactly once. m = d + 1 is the plain
pigeonhole form of Norouzi, Punjani & Fleet, "Fast Search in Hamming Space with Multi-Index Hashing"
(CVPR 2012); m > d + 1 trades more tables for longer bucket keys as in Manku, Jain & Das Sarma,
"Detecting Near-Duplicates for Web Crawling" (WWW 2007). With n distinct hashes, m is chosen to
minimise C(m, d) * (a n + b n^2 / 2^(64 (m - d) / m)) (a, b measured): for d = 6 and n = 10^6 that is
m = 8 (28 tables with 16-bit keys, ~10 candidates per hash and table) instead of m = 7 (7 tables with
9-bit keys, ~900 candidates per hash and table). Time O(C(m, d) (n log n + candidates)), about 10 s of
one core for 10^6 hashes at d = 6; memory O(n), about 120 bytes per hash at the peak, plus the pairs
found. Identical hashes are merged first, so a thousand copies of one image cost one. The cost grows
with the square of a cluster of distinct-but-close hashes (every pair in it is an answer).
(A Burkhard-Keller tree, "Some approaches to best-match file searching", CACM 1973, would also avoid
all pairs, but each query walks the tree node by node in Python, where these tables are a few
vectorised sorts.)
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bcc.errors import BccError

__all__ = [
    "DEFAULT_THRESHOLD",
    "HASH_BITS",
    "NearDupError",
    "NearDuplicateGroup",
    "NearDuplicates",
    "UnionFind",
    "hamming",
    "is_enabled",
    "join_near_duplicates",
    "merge_labels",
    "near_duplicate_edges",
    "near_duplicate_groups",
    "near_pairs",
    "phash",
    "straddling_pairs",
]

HASH_BITS = 64
# bits of 64: re-encoded or lightly resized copies land well inside, distinct fields outside. A pHash
# has 32 ones (its 64 coefficients are cut at their median), so distances are even: 6 and 7 agree.
DEFAULT_THRESHOLD = 6
MAX_THRESHOLD = 24  # beyond this a pHash no longer means "near-identical" and the search nears all pairs

# cost model of one table, in nanoseconds per distinct hash (mask, argsort, run bookkeeping) and per
# candidate pair (gather, xor, popcount); measured on one core with numpy 2 and only their ratio matters
_NS_PER_HASH = 150.0
_NS_PER_CANDIDATE = 40.0


class NearDupError(BccError):
    """A bad near-duplicate setting (threshold out of range) or a hash that is not 64 bits."""


@dataclass(frozen=True)
class NearDuplicateGroup:
    """One group of near-identical samples.

    members: sample indices (ascending) into the hash sequence the group was found in.
    max_distance: the largest Hamming distance (bits) between any two members' hashes; it can exceed
        the threshold when pairs chain (a~b, b~c).
    """

    members: tuple[int, ...]
    max_distance: int

    def entry(self, paths: Sequence[str]) -> dict:
        """The manifest's report entry: {"paths": [...], "max_distance": d}; paths[i] names sample i."""
        return {"paths": [str(paths[i]) for i in self.members], "max_distance": self.max_distance}


# ---- hashing ----------------------------------------------------------------------------------
# The 8 lowest-frequency rows of the unnormalised DCT-II of length 32 (scipy.fftpack.dct's type 2,
# norm None: y[k] = 2 sum_n x[n] cos(pi k (2n + 1) / 64)); the 8x8 corner of the 2-D DCT is C X C^T.
_DCT8 = 2 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)
# Both this product and scipy's FFT-based DCT are within ~1e-9 of the exact coefficients for 8-bit
# pixels (1,024 terms of at most 255 x 2 x 2, float64 rounding): a coefficient further than this from the
# median gets the same bit from either; nearer (ties: flat, mirrored or checkered images) scipy decides
_TIE = 1e-6


def phash(image) -> int:
    """64-bit DCT perceptual hash of a PIL image (any mode), as an unsigned int.

    Bit for bit `imagehash.phash` with hash_size 8 (tests/test_neardup.py checks it over a grid of
    images and the packer's real data): greyscale, 32x32 Lanczos, 2-D DCT, the 8x8 lowest frequencies
    thresholded at their median (the mean of the two middle values of a sort, the number
    `numpy.median` gives). The 8x8 corner of the DCT is two small matrix products, not two full
    32x32 DCTs; where a coefficient lies within `_TIE` of the median, whose side only the exact
    arithmetic of scipy's DCT decides, the hash is taken with `scipy.fftpack.dct` as imagehash does
    (imported then only: real photographs almost never need it, so a packer's workers skip scipy's
    ~0.25 s import). Bit 63 (the most significant) is the DC coefficient; `format(h, "016x")` is
    imagehash's own hex form (`imagehash.hex_to_hash` reads it back). Pass the decoded image converted
    to RGB (as the packer stores it): PIL's own conversion of a 16-bit image to greyscale clips
    instead of scaling.
    """
    from PIL import Image

    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    low = _DCT8 @ pixels @ _DCT8.T
    middle = np.sort(low, axis=None)[31:33]
    median = (middle[0] + middle[1]) / 2
    if np.abs(low - median).min() <= _TIE:
        import scipy.fftpack  # a near-tie: imagehash's own arithmetic decides

        low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8]
        middle = np.sort(low, axis=None)[31:33]
        median = (middle[0] + middle[1]) / 2
    bits = low.reshape(-1) > median
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return bin(a ^ b).count("1")


def is_enabled(threshold: int | None) -> bool:
    """False for the off switch (None or a negative threshold); raises on a threshold out of range."""
    if threshold is None:
        return False
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)):
        raise NearDupError(f"near-duplicate threshold must be an integer number of bits, not {threshold!r}")
    if threshold < 0:
        return False
    if threshold > MAX_THRESHOLD:
        raise NearDupError(
            f"near-duplicate threshold {threshold} is above {MAX_THRESHOLD} of {HASH_BITS} bits: "
            "that no longer means near-identical; use a smaller value, or switch near-duplicate grouping off "
            "(bcc pack --no-near-dup; near_dup_threshold=None)")
    return True


def _as_array(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.uint64:
        return hashes.reshape(-1)
    try:
        return np.fromiter((operator.index(h) for h in hashes), dtype=np.uint64, count=len(hashes))
    except (OverflowError, ValueError, TypeError) as e:
        raise NearDupError(f"perceptual hashes must be unsigned {HASH_BITS}-bit integers: {e}") from e


if hasattr(np, "bitwise_count"):  # numpy >= 2.0

    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)  # uint8

else:  # pragma: no cover - numpy 1.x
    _BYTE_COUNTS = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)

    def _popcount(x: np.ndarray) -> np.ndarray:
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


def _distinct_pairs(uh: np.ndarray, d: int, stats: dict | None = None, mapper: Callable = map) -> np.ndarray:
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
        dist = _popcount(x)
        ok = np.flatnonzero(dist <= d)  # few: the earlier-table test runs on these only
        candidates += int(active.size)
        for mask in earlier:
            ok = ok[(x[ok] & mask) != 0]
        if ok.size:
            a, b = left[ok], right[ok]
            found.append(np.stack([np.minimum(a, b), np.maximum(a, b), dist[ok].astype(np.int64)], axis=1))
        k += 1
    return candidates


class _Index:
    """Distinct hashes of n samples, which samples hold each, and the near pairs between them."""

    def __init__(self, hashes: Sequence[int] | np.ndarray, threshold: int, stats: dict | None = None,
                 mapper: Callable = map):
        self.hashes = _as_array(hashes)
        n = len(self.hashes)
        # what np.unique(return_inverse, return_counts) gives, from one stable sort and no inverse
        # (its sorted copies and n-long int64 inverse were ~11 MiB of a 200k pack's peak)
        self.order = np.argsort(self.hashes, kind="stable")  # samples grouped by distinct hash
        ranked = self.hashes[self.order]
        self.starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]) if n else np.zeros(0, np.int64)
        self.distinct = ranked[self.starts]
        del ranked
        self.counts = np.diff(np.r_[self.starts, n])
        self.first = self.order[self.starts]  # smallest sample index holding each distinct hash
        self.pairs = _distinct_pairs(self.distinct, threshold, stats, mapper)

    def members(self, u: int) -> list[int]:
        s = int(self.starts[u])
        return self.order[s:s + int(self.counts[u])].tolist()

    def edges(self) -> Iterable[tuple[int, int]]:
        """Sample pairs that connect exactly the near-duplicate components (not every pair)."""
        a, b = self.edge_arrays()
        return zip(a.tolist(), b.tolist(), strict=True)

    def edge_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """`edges` as two int64 arrays (equal-hash edges first, then near pairs); O(edges) memory."""
        n = len(self.order)
        group = np.repeat(np.arange(len(self.counts)), self.counts)  # distinct hash of each sorted position
        rest = np.ones(n, dtype=bool)
        rest[self.starts] = False  # every position but each group's first
        same_a, same_b = self.first[group[rest]], self.order[rest]
        near_a, near_b = self.first[self.pairs[:, 0]], self.first[self.pairs[:, 1]]
        return (np.concatenate([same_a, near_a]).astype(np.int64), np.concatenate([same_b, near_b]).astype(np.int64))


def near_pairs(hashes: Sequence[int] | np.ndarray, threshold: int | None = DEFAULT_THRESHOLD,
               stats: dict | None = None) -> np.ndarray:
    """Every pair of hashes within `threshold` bits, without comparing all pairs.

    hashes: n unsigned 64-bit ints (a sequence or a uint64 array).
    Returns an int64 array of shape (P, 3): rows (i, j, distance) with i < j sample indices, sorted by
    (i, j); equal hashes pair at distance 0. P can grow as the square of a cluster's size (k copies
    of one image give k(k-1)/2 rows): use `join_near_duplicates` to group without listing them.
    threshold None or negative: off, no pairs. `stats` (optional dict) receives blocks, tables,
    candidates (pairs compared) and distinct (distinct hashes).
    """
    if not is_enabled(threshold):
        return np.zeros((0, 3), dtype=np.int64)
    index = _Index(hashes, int(threshold), stats)
    rows: list[tuple[int, int, int]] = []
    for u in np.flatnonzero(index.counts > 1).tolist():
        rows.extend((i, j, 0) for i, j in itertools.combinations(index.members(u), 2))
    for a, b, dist in index.pairs.tolist():
        rows.extend((min(i, j), max(i, j), dist) for i in index.members(a) for j in index.members(b))
    if not rows:
        return np.zeros((0, 3), dtype=np.int64)
    out = np.array(rows, dtype=np.int64)
    return out[np.lexsort((out[:, 1], out[:, 0]))]


# ---- grouping ---------------------------------------------------------------------------------
class UnionFind:
    """Disjoint sets over 0..n-1; the root of a set is its smallest member, so ids are deterministic."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def __len__(self) -> int:
        return len(self.parent)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        """Join the sets of a and b; True when they were apart."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True

    def labels(self) -> list[int]:
        """Per element, its set's id (the set's smallest member)."""
        return [self.find(i) for i in range(len(self.parent))]


@dataclass(frozen=True)
class NearDuplicates:
    """What `join_near_duplicates` found and did.

    groups: the near-duplicate groups (connected components of the near-pair graph alone, chains
        joined), ordered by smallest member, for the manifest report.
    merged: how many sets of the caller's union-find it joined (0: they were already together).
    """

    groups: tuple[NearDuplicateGroup, ...]
    merged: int


def join_near_duplicates(uf: UnionFind, hashes: Sequence[int] | np.ndarray,
                         threshold: int | None = DEFAULT_THRESHOLD,
                         exact_keys: Sequence | None = None) -> NearDuplicates:
    """Add near-duplicate edges (hashes within `threshold` bits, equal hashes included) to `uf`.

    uf: a UnionFind over the same n samples (hashes[i] belongs to element i), typically already
    holding the exact-duplicate and `--group-regex` unions. exact_keys (e.g. each sample's sha256):
    a group whose members all share one key is an exact-duplicate set, reported elsewhere, and is
    left out of `groups` (its union still happens). Off (threshold None/-1): no change, no groups.
    """
    if len(hashes) != len(uf):
        raise NearDupError(f"{len(hashes)} hashes for a union-find over {len(uf)} samples")
    if exact_keys is not None and len(exact_keys) != len(hashes):
        raise NearDupError(f"{len(exact_keys)} exact keys for {len(hashes)} hashes")
    if not is_enabled(threshold):
        return NearDuplicates((), 0)
    index = _Index(hashes, int(threshold))
    edges = list(index.edges())
    merged = sum(uf.union(i, j) for i, j in edges)
    return NearDuplicates(_groups(index, edges, exact_keys), merged)


def near_duplicate_edges(hashes: Sequence[int] | np.ndarray, threshold: int | None = DEFAULT_THRESHOLD,
                         exact_keys: Sequence | np.ndarray | None = None, mapper: Callable = map
                         ) -> tuple[np.ndarray, np.ndarray, tuple[NearDuplicateGroup, ...]]:
    """`join_near_duplicates` without a union-find, for callers that join sets with arrays (the packer
    at a million images): (a, b, groups), where the int64 arrays a[k]-b[k] are the sample pairs that
    connect the near-duplicate components (equal hashes included; O(n) memory) and groups is the
    report. Off: empty arrays, no groups. `mapper`: how the pair search's table groups run (a process
    pool's `map` spreads them over its workers)."""
    if exact_keys is not None and len(exact_keys) != len(hashes):
        raise NearDupError(f"{len(exact_keys)} exact keys for {len(hashes)} hashes")
    if not is_enabled(threshold):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, ()
    index = _Index(hashes, int(threshold), mapper=mapper)
    a, b = index.edge_arrays()
    return a, b, _groups(index, zip(a.tolist(), b.tolist(), strict=True), exact_keys)


def _groups(index: _Index, edges: Iterable[tuple[int, int]], exact_keys: Sequence | None):
    edges = list(edges)
    touched = sorted({i for edge in edges for i in edge})
    local = {i: k for k, i in enumerate(touched)}  # a union-find over the touched samples only
    near = UnionFind(len(touched))
    for i, j in edges:
        near.union(local[i], local[j])
    sets: dict[int, list[int]] = {}
    for k, i in enumerate(touched):
        sets.setdefault(near.find(k), []).append(i)
    groups = []
    for root in sorted(sets):  # roots are smallest members, so this orders groups by first member
        members = sets[root]
        if exact_keys is not None and len({exact_keys[i] for i in members}) == 1:
            continue
        groups.append(NearDuplicateGroup(tuple(members), _diameter(index.hashes[members])))
    return tuple(groups)


def merge_labels(labels: Sequence, hashes: Sequence[int] | np.ndarray,
                 threshold: int | None = DEFAULT_THRESHOLD) -> list[int]:
    """Group labels widened by near duplicates.

    labels: one hashable group label per sample (samples with equal labels stay together, e.g. a
    sha256 or a `--group-regex` match; give unique labels to samples in no group). Returns per
    sample the smallest sample index of its merged group: deterministic, whatever the label values.
    """
    if len(labels) != len(hashes):
        raise NearDupError(f"{len(labels)} labels for {len(hashes)} hashes")
    uf = UnionFind(len(labels))
    first: dict = {}
    for i, label in enumerate(labels):
        j = first.setdefault(label, i)
        if j != i:
            uf.union(j, i)
    join_near_duplicates(uf, hashes, threshold)
    return uf.labels()


def _diameter(values: np.ndarray, chunk: int = 1024) -> int:
    """Largest pairwise Hamming distance among hashes, in row chunks (memory O(chunk * k)); a small
    group (most are 2-3 images) by Python ints, ~20x cheaper than a numpy call per group."""
    if len(values) <= 16:
        return max((hamming(a, b) for a, b in itertools.combinations(values.tolist(), 2)), default=0)
    values = np.unique(values)
    best = 0
    for s in range(0, len(values), chunk):
        x = values[s:s + chunk, None] ^ values[None, :]
        best = max(best, int(_popcount(x.reshape(-1)).max()))
    return best


def near_duplicate_groups(hashes: Sequence[int] | np.ndarray, threshold: int | None = DEFAULT_THRESHOLD,
                          exact_keys: Sequence | None = None) -> list[NearDuplicateGroup]:
    """The groups of `join_near_duplicates` without a union-find of the caller's. Off: [].

    `g.entry(paths)` is a group's manifest entry.
    """
    return list(join_near_duplicates(UnionFind(len(hashes)), hashes, threshold, exact_keys).groups)


def straddling_pairs(pairs: Iterable[Sequence[int]], split: Sequence[int]) -> int:
    """How many (i, j, ...) pairs have their two samples in different splits (a leakage count)."""
    return sum(1 for p in pairs if split[p[0]] != split[p[1]])
