"""Near-duplicate images: 64-bit perceptual hashes, their groups within a Hamming radius, and the pairs.

Exact copies share a sha256; near copies (the same smear field re-shot, re-encoded or lightly resized)
do not, but their perceptual hashes differ in a few bits. Such pairs must stay on one side of a split,
so the packer hashes every source image (`phash`) and joins hashes within `threshold` bits (default 6
of 64), chains included, into the split's groups: `near_duplicate_edges` (a spanning set of fewer
than n edges, for array union-finds), `near_duplicate_roots` (each sample's component),
`join_near_duplicates` (on a `UnionFind` that already holds the exact-duplicate and `--group-regex`
unions) or `merge_labels` (on existing group labels); `near_duplicate_groups` gives the groups for the
manifest report. Grouping never lists pairs (`bcc.neardup_search.distinct_components`): a dense
cluster (tens of thousands of near-blank images within a few bits of one another) costs about linear
time and O(n) memory. `near_pairs` lists every pair (a reference and a report tool): its output is as
large as the number of pairs, quadratic in such a cluster.

The search never compares all pairs. It is multi-index hashing with the generalised pigeonhole
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
found (pairs only for `near_pairs`). Identical hashes are merged first, so a thousand copies of one
image cost one. Listing pairs costs the square of a cluster of distinct-but-close hashes (every pair
in it is an answer); grouping does not (see `bcc.neardup_search`).
(A Burkhard-Keller tree, "Some approaches to best-match file searching", CACM 1973, would also avoid
all pairs, but each query walks the tree node by node in Python, where these tables are a few
vectorised sorts.)
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bcc.errors import BccError
from bcc.neardup_search import distinct_components, distinct_pairs, majority, popcount

__all__ = [
    "DEFAULT_THRESHOLD",
    "HASH_BITS",
    "NearDupError",
    "NearDuplicateGroup",
    "NearDuplicates",
    "SAME_PICTURE_BITS",
    "UnionFind",
    "hamming",
    "is_enabled",
    "join_near_duplicates",
    "merge_labels",
    "near_duplicate_edges",
    "near_duplicate_groups",
    "near_duplicate_roots",
    "near_pairs",
    "phash",
    "straddling_pairs",
]

HASH_BITS = 64
# bits of 64: re-encoded or lightly resized copies land well inside, distinct fields outside. A pHash
# has 32 ones (its 64 coefficients are cut at their median), so distances are even: 6 and 7 agree.
DEFAULT_THRESHOLD = 6
# Two packs compared by pHash (bcc.sample_index.check_sources across data.sources, bcc.pretrained_overlap
# against model.pretrained's training images): re-encodes of one image (JPEG qualities, PNG, a resize)
# were measured 0-4 bits apart, different synthetic images 8 or more, and one real pair of different
# fields 6. Within SAME_PICTURE_BITS: the same picture (across train and val/test, a leak that refuses
# the run); above it and within DEFAULT_THRESHOLD: near-identical, a warning (different pictures lie
# that close); the packer keeps both kinds on one side of its split.
SAME_PICTURE_BITS = 4
MAX_THRESHOLD = 24  # beyond this a pHash no longer means "near-identical" and the search nears all pairs


class NearDupError(BccError):
    """A bad near-duplicate setting (threshold out of range) or a hash that is not 64 bits."""


@dataclass(frozen=True)
class NearDuplicateGroup:
    """One group of near-identical samples.

    members: sample indices (ascending) into the hash sequence the group was found in.
    max_distance: the largest Hamming distance (bits) between any two members' hashes; it can exceed
        the threshold when pairs chain (a~b, b~c). Exact, except for a group of well over 10^4
        distinct hashes without a centre (see `_diameter`), where it is an upper bound.
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


class _Index:
    """Distinct hashes of n samples, which samples hold each, and either the near-duplicate component
    of each distinct hash (`root`, the default: O(n), what grouping needs) or every near pair between
    distinct hashes (`pairs`, with `pairs=True`: grows as the square of a dense cluster)."""

    def __init__(self, hashes: Sequence[int] | np.ndarray, threshold: int, stats: dict | None = None,
                 mapper: Callable = map, pairs: bool = False):
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
        if pairs:
            self.pairs = distinct_pairs(self.distinct, threshold, stats, mapper)
        else:
            self.root = distinct_components(self.distinct, threshold, stats, mapper)

    def members(self, u: int) -> list[int]:
        s = int(self.starts[u])
        return self.order[s:s + int(self.counts[u])].tolist()

    def edges(self) -> Iterable[tuple[int, int]]:
        """Sample pairs that connect exactly the near-duplicate components (not every pair)."""
        a, b = self.edge_arrays()
        return zip(a.tolist(), b.tolist(), strict=True)

    def edge_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """`edges` as two int64 arrays (equal-hash edges first, then one edge from each distinct hash
        to its component's first): fewer than n edges, whatever the clusters."""
        n = len(self.order)
        group = np.repeat(np.arange(len(self.counts)), self.counts)  # distinct hash of each sorted position
        rest = np.ones(n, dtype=bool)
        rest[self.starts] = False  # every position but each group's first
        same_a, same_b = self.first[group[rest]], self.order[rest]
        joined = np.flatnonzero(self.root != np.arange(len(self.root)))
        near_a, near_b = self.first[self.root[joined]], self.first[joined]
        return (np.concatenate([same_a, near_a]).astype(np.int64), np.concatenate([same_b, near_b]).astype(np.int64))

    def sample_roots(self) -> np.ndarray:
        """(n,) int64: per sample, the smallest sample index of its near-duplicate component."""
        smallest = np.full(len(self.root), len(self.order), dtype=np.int64)
        np.minimum.at(smallest, self.root, self.first)  # per component root, its smallest sample
        out = np.empty(len(self.order), dtype=np.int64)
        out[self.order] = np.repeat(smallest[self.root], self.counts)
        return out


def near_pairs(hashes: Sequence[int] | np.ndarray, threshold: int | None = DEFAULT_THRESHOLD,
               stats: dict | None = None) -> np.ndarray:
    """Every pair of hashes within `threshold` bits, without comparing all pairs.

    hashes: n unsigned 64-bit ints (a sequence or a uint64 array).
    Returns an int64 array of shape (P, 3): rows (i, j, distance) with i < j sample indices, sorted by
    (i, j); equal hashes pair at distance 0. P, and the time and memory, grow as the square of a
    cluster's size (k copies of one image, or k distinct hashes within a few bits of one centre, give
    up to k(k-1)/2 rows: 44 M rows, 8 GiB, for k = 20,000): for reports and tests on bounded inputs;
    group with `near_duplicate_roots` / `near_duplicate_edges` / `join_near_duplicates`, which never
    list them.
    threshold None or negative: off, no pairs. `stats` (optional dict) receives blocks, tables,
    candidates (pairs compared) and distinct (distinct hashes).
    """
    if not is_enabled(threshold):
        return np.zeros((0, 3), dtype=np.int64)
    index = _Index(hashes, int(threshold), stats, pairs=True)
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
    merged = sum(uf.union(i, j) for i, j in index.edges())
    return NearDuplicates(_groups(index, exact_keys), merged)


def near_duplicate_edges(hashes: Sequence[int] | np.ndarray, threshold: int | None = DEFAULT_THRESHOLD,
                         exact_keys: Sequence | np.ndarray | None = None, mapper: Callable = map
                         ) -> tuple[np.ndarray, np.ndarray, tuple[NearDuplicateGroup, ...]]:
    """`join_near_duplicates` without a union-find, for callers that join sets with arrays (the packer
    at a million images): (a, b, groups), where the int64 arrays a[k]-b[k] are the sample pairs that
    connect the near-duplicate components (equal hashes included; O(n) memory) and groups is the
    report. The edges are fewer than n (a spanning set, not every near pair), however dense the
    clusters. Off: empty arrays, no groups. `mapper`: how the search's table groups run (a process
    pool's `map` spreads them over its workers)."""
    if exact_keys is not None and len(exact_keys) != len(hashes):
        raise NearDupError(f"{len(exact_keys)} exact keys for {len(hashes)} hashes")
    if not is_enabled(threshold):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, ()
    index = _Index(hashes, int(threshold), mapper=mapper)
    a, b = index.edge_arrays()
    return a, b, _groups(index, exact_keys)


def near_duplicate_roots(hashes: Sequence[int] | np.ndarray, threshold: int | None = DEFAULT_THRESHOLD,
                         mapper: Callable = map) -> np.ndarray:
    """Per sample, the smallest sample index of its near-duplicate component (hashes within
    `threshold` bits joined, chains and equal hashes too): an (n,) int64 array, root[i] <= i, what
    `near_duplicate_edges` + `bcc.split.connected_components` give, without the edges or the group
    report. O(n) memory. Off: every sample its own root."""
    if not is_enabled(threshold):
        return np.arange(len(hashes), dtype=np.int64)
    return _Index(hashes, int(threshold), mapper=mapper).sample_roots()


def _groups(index: _Index, exact_keys: Sequence | None) -> tuple[NearDuplicateGroup, ...]:
    """The components of two or more samples, ordered by smallest member, from `index.sample_roots()`
    (O(n log n), no edge list)."""
    root = index.sample_roots()
    sizes = np.bincount(root, minlength=len(root))
    grouped = np.flatnonzero(sizes[root] > 1)  # ascending sample indices in a group of 2+
    grouped = grouped[np.argsort(root[grouped], kind="stable")]  # by group (its smallest member), then index
    bounds = np.cumsum(sizes[np.unique(root[grouped])])[:-1] if grouped.size else []
    groups = []
    for members in np.split(grouped, bounds):
        if not members.size:
            continue
        members = members.tolist()
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


_DIAMETER_WORK = 1 << 27  # hash comparisons one group's diameter may take (~0.5 s) before it settles for a bound


def _diameter(values: np.ndarray, work: int = _DIAMETER_WORK) -> int:
    """Largest pairwise Hamming distance among hashes; a small group (most are 2-3 images) by Python
    ints, ~20x cheaper than a numpy call per group. A large one (k distinct hashes) by eccentricities
    with triangle-inequality pruning: ecc(y) <= d(y, x) + ecc(x) for every x whose eccentricity is
    known (the bitwise majority first, a centre), and the member with the largest bound is measured
    next until no bound exceeds the largest eccentricity found; a dense cluster around one centre
    takes a few O(k) passes instead of k^2 / 2 comparisons. Exact unless that would take more than
    `work` comparisons (a large group without a centre, k well above 10^4): then the smallest bound
    proved, never below the true diameter."""
    if len(values) <= 16:
        return max((hamming(a, b) for a, b in itertools.combinations(values.tolist(), 2)), default=0)
    values = np.unique(values)
    dist = popcount(values ^ majority(values)).astype(np.int64)
    bound = dist + dist.max()
    best = 0
    while True:
        x = int(bound.argmax())
        if bound[x] <= best:
            return best
        if work < len(values):
            return int(bound[x])
        work -= len(values)
        dist = popcount(values ^ values[x]).astype(np.int64)
        ecc = int(dist.max())
        best = max(best, ecc)
        np.minimum(bound, dist + ecc, out=bound)
        bound[x] = ecc


def near_duplicate_groups(hashes: Sequence[int] | np.ndarray, threshold: int | None = DEFAULT_THRESHOLD,
                          exact_keys: Sequence | None = None) -> list[NearDuplicateGroup]:
    """The groups of `join_near_duplicates` without a union-find of the caller's. Off: [].

    `g.entry(paths)` is a group's manifest entry.
    """
    return list(join_near_duplicates(UnionFind(len(hashes)), hashes, threshold, exact_keys).groups)


def straddling_pairs(pairs: Iterable[Sequence[int]], split: Sequence[int]) -> int:
    """How many (i, j, ...) pairs have their two samples in different splits (a leakage count)."""
    return sum(1 for p in pairs if split[p[0]] != split[p[1]])
