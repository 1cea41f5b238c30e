"""bcc.neardup: the pair index equals brute force, groups are deterministic, real re-encodes hash close."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from bcc import neardup, neardup_search
from bcc.errors import BccError
from bcc.neardup import (
    DEFAULT_THRESHOLD,
    NearDupError,
    NearDuplicates,
    UnionFind,
    hamming,
    join_near_duplicates,
    merge_labels,
    near_duplicate_edges,
    near_duplicate_groups,
    near_duplicate_roots,
    near_pairs,
    phash,
)
from bcc.neardup_search import _block_masks


def _flip(h: int, bits) -> int:
    for b in bits:
        h ^= 1 << int(b)
    return h


def _clustered_hashes(n: int, seed: int) -> np.ndarray:
    """n hashes: a third random, the rest copies of earlier ones with 0..12 bits flipped (chains too)."""
    rng = np.random.default_rng(seed)
    base = n // 3
    hashes = [int(x) for x in rng.integers(0, 2**64, size=base, dtype=np.uint64, endpoint=False)]
    while len(hashes) < n:
        src = hashes[int(rng.integers(len(hashes)))]
        hashes.append(_flip(src, rng.choice(64, size=int(rng.integers(0, 13)), replace=False)))
    return np.array(hashes, dtype=np.uint64)


def _brute_force(hashes: np.ndarray, threshold: int) -> list[list[int]]:
    d = np.bitwise_count(hashes[:, None] ^ hashes[None, :]).astype(np.int64)
    i, j = np.nonzero(np.triu(d <= threshold, k=1))
    return np.stack([i, j, d[i, j]], axis=1).tolist()


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    return _clustered_hashes(2000, seed=0)


@pytest.mark.parametrize("threshold", range(0, 11))
def test_pairs_equal_brute_force(clustered, threshold):
    expected = _brute_force(clustered, threshold)
    stats: dict = {}
    got = near_pairs(clustered, threshold, stats=stats)
    assert got.tolist() == expected  # same pairs, same distances, each once, sorted by (i, j)
    assert len(expected) > 0
    n = len(clustered)
    assert stats["candidates"] < n * (n - 1) // 2 // 4  # never near all pairs


@pytest.mark.parametrize("threshold", [0, 2, 3, 6, 8])
@pytest.mark.parametrize("extra_blocks", [1, 2, 4])
def test_more_blocks_than_pigeonhole_still_exact(clustered, monkeypatch, threshold, extra_blocks):
    # small n picks m = d + 1 blocks; large n picks more (one table per choice of m - d blocks, each
    # pair reported by the first table it agrees on): force that path here against brute force
    monkeypatch.setattr(neardup_search, "_choose_blocks", lambda n, d: d + 1 + extra_blocks)
    stats: dict = {}
    assert near_pairs(clustered, threshold, stats=stats).tolist() == _brute_force(clustered, threshold)
    assert stats["blocks"] == threshold + 1 + extra_blocks


def test_planted_pairs_at_each_distance_around_the_threshold():
    rng = np.random.default_rng(1)
    anchors = [int(x) for x in rng.integers(0, 2**64, size=40, dtype=np.uint64, endpoint=False)]
    hashes, planted = list(anchors), {}
    for k, a in enumerate(anchors[:36]):
        dist = k % 9  # 0..8, four pairs each
        planted[(k, len(hashes))] = dist
        hashes.append(_flip(a, rng.choice(64, size=dist, replace=False)))
    brute = {(i, j): d for i, j, d in _brute_force(np.array(hashes, dtype=np.uint64), 64)}
    for threshold in (4, DEFAULT_THRESHOLD, 8):
        got = {(i, j): d for i, j, d in near_pairs(hashes, threshold).tolist()}
        want = {p: d for p, d in brute.items() if d <= threshold}
        assert got == want
        for pair, dist in planted.items():
            assert (pair in got) == (dist <= threshold), (pair, dist, threshold)


def test_threshold_zero_pairs_only_identical_hashes():
    h = [5, 5, 7, 5, 2**63 + 1, 2**63 + 1, 4]  # 5 vs 7 and 5 vs 4 differ in one bit
    assert near_pairs(h, 0).tolist() == [[0, 1, 0], [0, 3, 0], [1, 3, 0], [4, 5, 0]]
    groups = near_duplicate_groups(h, 0)
    assert [(g.members, g.max_distance) for g in groups] == [((0, 1, 3), 0), ((4, 5), 0)]


@pytest.mark.parametrize("off", [None, -1])
def test_off_switch(clustered, off):
    assert near_pairs(clustered, off).shape == (0, 3)
    assert near_duplicate_groups(clustered, off) == []
    uf = UnionFind(len(clustered))
    uf.union(3, 7)
    assert join_near_duplicates(uf, clustered, off) == NearDuplicates((), 0)
    assert uf.labels() == [3 if i == 7 else i for i in range(len(clustered))]
    assert merge_labels(["a", "b", "a"], [0, 0, 0], off) == [0, 1, 0]


@pytest.mark.parametrize("bad", [65, 25, "6", 6.0, True])
def test_bad_threshold_is_a_named_error(bad):
    with pytest.raises(NearDupError) as e:
        near_pairs([1, 2], bad)
    assert isinstance(e.value, BccError)


def test_bad_hash_and_length_mismatch_are_named_errors():
    for bad in ([1, 2**64], [-1, 2], [1.5, 2], ["ff", 2]):
        with pytest.raises(NearDupError, match="64-bit"):
            near_pairs(bad)
    with pytest.raises(NearDupError, match="union-find"):
        join_near_duplicates(UnionFind(3), [1, 2])
    with pytest.raises(NearDupError):
        merge_labels(["a"], [1, 2])


def test_block_masks_partition_the_hash():
    for m in range(1, 40):
        masks = _block_masks(m)
        assert len(masks) == m and sum(masks) == 2**64 - 1
        assert all(a & b == 0 for i, a in enumerate(masks) for b in masks[i + 1:])
        widths = {bin(x).count("1") for x in masks}
        assert max(widths) - min(widths) <= 1


# ---- grouping ---------------------------------------------------------------------------------
def test_chains_join_and_max_distance_is_the_diameter():
    a = 0x0F0F_0F0F_0F0F_0F0F
    b = _flip(a, range(0, 5))  # 5 from a
    c = _flip(b, range(10, 15))  # 5 from b, 10 from a
    far = ~a & (2**64 - 1)
    groups = near_duplicate_groups([far, a, b, c, far], 6)
    assert [(g.members, g.max_distance) for g in groups] == [((0, 4), 0), ((1, 2, 3), 10)]
    # exact copies (same sha256) are reported elsewhere; a group mixing exact and near stays
    keys = ["x", "a", "b", "c", "x"]
    assert [g.members for g in near_duplicate_groups([far, a, b, c, far], 6, exact_keys=keys)] == [(1, 2, 3)]
    paths = ["x.jpg", "a.jpg", "b.jpg", "c.jpg", "x2.jpg"]
    assert groups[1].entry(paths) == {"paths": ["a.jpg", "b.jpg", "c.jpg"], "max_distance": 10}


def test_group_ids_are_deterministic_under_reordering(clustered):
    labels = merge_labels(list(range(len(clustered))), clustered, DEFAULT_THRESHOLD)
    assert labels == merge_labels(list(range(len(clustered))), clustered.copy(), DEFAULT_THRESHOLD)
    assert all(labels[i] <= i for i in range(len(labels)))  # the id is the group's smallest index
    perm = np.random.default_rng(3).permutation(len(clustered))
    shuffled = merge_labels(list(range(len(clustered))), clustered[perm], DEFAULT_THRESHOLD)

    def partition(lab, index_of):
        sets: dict[int, set[int]] = {}
        for pos, g in enumerate(lab):
            sets.setdefault(g, set()).add(index_of(pos))
        return sorted(sorted(s) for s in sets.values())

    assert partition(labels, int) == partition(shuffled, lambda pos: int(perm[pos]))
    groups = near_duplicate_groups(clustered, DEFAULT_THRESHOLD)
    assert groups == near_duplicate_groups(clustered[::-1][::-1].copy(), DEFAULT_THRESHOLD)
    assert [g.members[0] for g in groups] == sorted(g.members[0] for g in groups)
    # the groups are exactly the label sets of size >= 2
    assert sorted(g.members for g in groups) == sorted(
        tuple(s) for s in partition(labels, int) if len(s) > 1)


def test_join_adds_near_edges_to_existing_groups():
    # samples 0..5; a regex group already joins 1 and 4; 0~2 are near, 3 and 5 are identical hashes
    # (different bytes), 1 and 4 are far apart: their regex group is kept but is no near group
    h = [0xAAAA, 0xFFFF_0000_0000_0000, 0xAAAB, 0x1234_5678_9ABC_DEF0, 0x00FF_00FF_00FF_00FF,
         0x1234_5678_9ABC_DEF0]
    uf = UnionFind(6)
    uf.union(1, 4)
    found = join_near_duplicates(uf, h, 6)
    assert found.merged == 2
    assert [(g.members, g.max_distance) for g in found.groups] == [((0, 2), 1), ((3, 5), 0)]
    assert uf.labels() == [0, 1, 0, 3, 1, 3]
    assert merge_labels(["p", "q", "r", "s", "q", "t"], h, 6) == [0, 1, 0, 3, 1, 3]
    again = join_near_duplicates(uf, h, 6)
    assert again.merged == 0 and again.groups == found.groups  # idempotent
    # 3 and 5 as exact copies (same sha256): unioned, but reported with the exact duplicates
    keys = ["a", "b", "c", "d", "e", "d"]
    assert [g.members for g in join_near_duplicates(UnionFind(6), h, 6, exact_keys=keys).groups] == [(0, 2)]


def test_scales_without_all_pairs():
    rng = np.random.default_rng(4)
    n = 30_000
    h = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
    h[n // 2:n // 2 + 100] = h[:100] ^ np.uint64(0b1011)  # 100 planted pairs at distance 3
    stats: dict = {}
    pairs = near_pairs(h, DEFAULT_THRESHOLD, stats=stats)
    assert {(i, j) for i, j, _ in pairs.tolist()} >= {(k, n // 2 + k) for k in range(100)}
    assert stats["candidates"] < 50 * n  # all pairs would be 4.5e8


def _ball(n: int, radius: int, seed: int) -> np.ndarray:
    """n distinct hashes within `radius` bits of one centre (1..radius random bits flipped): a dense
    cluster, as thousands of nearly blank or uniform images give."""
    rng = np.random.default_rng(seed)
    centre = int(rng.integers(0, 2**64, dtype=np.uint64, endpoint=False))
    out: set[int] = set()
    while len(out) < n:
        out.add(_flip(centre, rng.choice(64, size=int(rng.integers(1, radius + 1)), replace=False)))
    return rng.permutation(np.array(sorted(out), dtype=np.uint64))


def _brute_roots(hashes: np.ndarray, threshold: int) -> list[int]:
    """Per sample, the smallest index of its component under all pairs within `threshold` (brute force)."""
    from bcc.split import connected_components

    i, j = np.nonzero(np.triu(np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= threshold, k=1))
    return connected_components(len(hashes), i, j).tolist()


@pytest.fixture(scope="module")
def component_cases(clustered) -> list[tuple[str, int, np.ndarray, list[int]]]:
    """(name, threshold, hashes, brute-force roots): random, clustered and dense inputs (one ball within
    the threshold: one component; a wider ball: many; copies of hashes too)."""
    rng = np.random.default_rng(7)
    wide = _ball(600, 10, seed=8)
    mixed = np.concatenate([clustered[:600], _ball(300, 6, seed=9), wide[:300], wide[:50]])
    inputs = {"clustered": clustered, "dense": _ball(800, 6, seed=5), "wide": wide,
              "mixed": mixed[rng.permutation(len(mixed))]}
    return [(name, t, h, _brute_roots(h, t)) for name, h in inputs.items() for t in (0, 3, DEFAULT_THRESHOLD, 8)]


def _pool_map(fn, tasks):  # not the builtin map: the tables run in 4 groups whose components merge
    return [fn(t) for t in tasks]


@pytest.mark.parametrize("big_bucket", [neardup_search.BIG_BUCKET, 3])
@pytest.mark.parametrize("mapper", [map, _pool_map])
def test_components_equal_brute_force(component_cases, monkeypatch, big_bucket, mapper):
    """The groups are exactly those of all pairs within the threshold (`component_cases`), whether
    large buckets are settled by pivots (big_bucket 3: every bucket of 4+) or pairwise, in one pass or
    in table groups."""
    monkeypatch.setattr(neardup_search, "BIG_BUCKET", big_bucket)
    for name, threshold, hashes, want in component_cases:
        assert near_duplicate_roots(hashes, threshold, mapper=mapper).tolist() == want, (name, threshold)
        a, b, groups = near_duplicate_edges(hashes, threshold, mapper=mapper)
        assert len(a) < len(hashes)  # a spanning set, not the pairs
        uf = UnionFind(len(hashes))
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            uf.union(i, j)
        assert uf.labels() == want, (name, threshold)
        sets: dict[int, list[int]] = {}
        for i, r in enumerate(want):
            sets.setdefault(r, []).append(i)
        assert [g.members for g in groups] == [tuple(m) for r, m in sorted(sets.items()) if len(m) > 1]
        for g in groups[:20]:
            v = hashes[list(g.members)]
            assert g.max_distance == int(np.bitwise_count(v[:, None] ^ v[None, :]).max())


def test_dense_cluster_groups_in_near_linear_time():
    """20,000 distinct hashes within 6 bits of one centre: 44 M pairs within 6 bits (8.5 GiB and 98 s
    before grouping stopped listing them); grouping compares a few per hash and returns n - 1 edges."""
    h = _ball(20_000, DEFAULT_THRESHOLD, seed=3)
    stats: dict = {}
    root = neardup_search.distinct_components(np.sort(h), DEFAULT_THRESHOLD, stats)
    assert (root == 0).all()
    assert stats["candidates"] < 100 * len(h)  # all pairs: 2e8
    a, b, groups = near_duplicate_edges(h, DEFAULT_THRESHOLD)
    assert len(a) == len(h) - 1 and len(groups) == 1 and groups[0].max_distance == 12


def test_diameter_prunes_and_bounds():
    rng = np.random.default_rng(11)
    for values in (_ball(3000, 6, seed=1), _ball(2000, 12, seed=2),
                   rng.integers(0, 2**64, size=500, dtype=np.uint64, endpoint=False)):
        x = values[:, None] ^ values[None, :]
        exact = int(np.bitwise_count(x).max())
        assert neardup._diameter(values) == exact
        assert neardup._diameter(values, work=len(values)) >= exact  # out of budget: a bound, never below
    assert neardup._diameter(_ball(3000, 6, seed=1), work=3 * 3000) == 12  # a centre proves it in a few passes


# ---- real images ------------------------------------------------------------------------------
def _textured(seed: int, size: int = 192) -> Image.Image:
    """A smooth random field with cell-like blobs: structure at the frequencies pHash looks at."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC)
    px = np.asarray(low, dtype=np.float64) + rng.normal(0, 12, size=(size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    for _ in range(5):
        cy, cx, r = rng.integers(20, size - 20), rng.integers(20, size - 20), rng.integers(8, 24)
        px[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] *= 0.4
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))


def _reencoded(img: Image.Image) -> Image.Image:
    """The same field re-encoded: lower JPEG quality and 85% size, as a re-shot or re-exported copy."""
    buf = io.BytesIO()
    small = img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.Resampling.BILINEAR)
    small.save(buf, "JPEG", quality=60)
    with Image.open(io.BytesIO(buf.getvalue())) as out:
        return out.convert("RGB")


def test_phash_is_imagehash_phash(monkeypatch):
    """Bit for bit imagehash's pHash (bcc's own median, no ImageHash object, the DCT's 8x8 corner by
    matrix products) over sizes down to 1 px, flat images (all-zero AC: ties at the median), noise,
    edges and modes; only near-ties take scipy's DCT (a textured image never does)."""
    import imagehash
    import scipy.fftpack

    calls = []
    real_dct = scipy.fftpack.dct
    monkeypatch.setattr(scipy.fftpack, "dct", lambda *a, **k: calls.append(1) or real_dct(*a, **k))
    img = _textured(0)
    assert format(phash(img), "016x") == str(imagehash.phash(img))
    assert phash(img.convert("L")) == phash(img)
    assert len(calls) == 2  # imagehash's own two; bcc's hash of a textured image needs no scipy
    phash(Image.fromarray(np.full((8, 8, 3), 97, np.uint8)))
    assert len(calls) == 4  # a flat image is all ties: scipy's arithmetic decides, as in imagehash
    rng = np.random.default_rng(0)
    for w, h in ((1, 1), (3, 2), (31, 33), (64, 64)):
        flat = np.full((h, w, 3), 97, np.uint8)
        edge = np.zeros((h, w, 3), np.uint8)
        edge[:, : w // 2] = 255
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for a in (flat, edge, noise):
            for mode in ("RGB", "L", "P", "RGBA"):
                im = Image.fromarray(a).convert(mode)
                assert format(phash(im), "016x") == str(imagehash.phash(im)), (w, h, mode)


def test_reencoded_copy_is_near_and_distinct_images_are_not():
    originals = [_textured(s) for s in range(6)]
    hashes = [phash(im) for im in originals]
    copies = [phash(_reencoded(im)) for im in originals]
    for h, c in zip(hashes, copies, strict=True):
        assert hamming(h, c) <= DEFAULT_THRESHOLD
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            assert hamming(hashes[i], hashes[j]) > 2 * DEFAULT_THRESHOLD
    groups = near_duplicate_groups(hashes + copies, DEFAULT_THRESHOLD)
    assert [g.members for g in groups] == [(k, k + 6) for k in range(6)]
