"""The packer's split and fold dealing, vectorised, against the unit-by-unit greedy it replaces."""

import random

import numpy as np

from bcc.split import _deal, largest_remainder


def _greedy_splits(sizes, fractions):
    """Each unit to the split furthest below its target (ties: larger fraction, then first)."""
    targets = largest_remainder(sum(sizes), fractions)
    allowed = [k for k, f in enumerate(fractions) if f > 0]
    filled, dealt = [0, 0, 0], []
    for size in sizes:
        k = max(allowed, key=lambda k: (targets[k] - filled[k], fractions[k], -k))
        filled[k] += size
        dealt.append(k)
    return dealt


def _greedy_folds(sizes, folds, total):
    """Each unit to the fold with the fewest of its class (ties: fewest in all, then first)."""
    filled, dealt = [0] * folds, []
    for size in sizes:
        k = min(range(folds), key=lambda k: (filled[k], total[k], k))
        filled[k] += size
        total[k] += size
        dealt.append(k)
    return dealt


def test_deal_is_the_unit_by_unit_greedy_over_a_grid():
    rng = random.Random(0)
    for case in range(400):
        n = rng.choice([1, 2, 3, 7, 40, 300])
        big = rng.choice([1, 2, 5, 30])
        sizes = [rng.choice([1] * 6 + list(range(2, big + 1))) for _ in range(n)]
        if case % 2:  # the packer's order: big units first (stable); any order must agree too
            sizes.sort(reverse=True)
        fractions = rng.choice([(0.8, 0.1, 0.1), (0.7, 0.15, 0.15), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0),
                                (0.34, 0.33, 0.33), (0.6, 0.0, 0.4)])
        deficit = np.array(largest_remainder(sum(sizes), fractions), dtype=np.int64)
        allowed = [k for k, f in enumerate(fractions) if f > 0]
        got = _deal(sizes, allowed, -deficit, -np.array(fractions))
        assert got.tolist() == _greedy_splits(sizes, fractions), (sizes, fractions)

        folds = rng.choice([2, 3, 5])
        total = [rng.randrange(0, 20) for _ in range(folds)]
        other = np.array(total, dtype=np.int64)
        got = _deal(sizes, list(range(folds)), np.zeros(folds, dtype=np.int64), np.zeros(folds, dtype=np.int64),
                    other=other)
        assert got.tolist() == _greedy_folds(sizes, folds, total), (sizes, folds)
        assert other.tolist() == total  # the running totals carry over to the next class alike


def test_components_are_scipys_with_the_smallest_member_as_root():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from bcc import split

    rng = np.random.default_rng(0)
    graphs = [(1, [], []), (5, [4, 3, 2, 1], [3, 2, 1, 0]), (6, [0, 5, 5], [5, 0, 5])]  # chain, repeats, loops
    for _ in range(60):
        n = int(rng.integers(1, 300))
        e = int(rng.integers(0, 2 * n))
        graphs.append((n, rng.integers(0, n, e).tolist(), rng.integers(0, n, e).tolist()))
    path = np.arange(2000)
    graphs.append((2000, path[1:][::-1].tolist(), path[:-1][::-1].tolist()))  # a long path, worst order
    for n, a, b in graphs:
        root = split.connected_components(n, np.array(a, dtype=np.int64), np.array(b, dtype=np.int64))
        _, label = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
        first = {}
        for i, c in enumerate(label.tolist()):
            first.setdefault(c, i)
        assert root.tolist() == [first[c] for c in label.tolist()]


def test_digest_ids_are_np_uniques_numbering_over_a_grid():
    """`digest_ids` (first 8 bytes sorted, ties on the full digest) numbers rows exactly as
    np.unique over 32-byte voids: copies, shared 8-byte prefixes with differing tails, one row."""
    from bcc.split import digest_ids

    rng = np.random.default_rng(0)
    assert digest_ids(np.zeros((0, 32), dtype=np.uint8)).tolist() == []
    for trial in range(300):
        n = int(rng.integers(1, 300))
        d = rng.integers(0, 256, (n, 32), dtype=np.uint8)
        if trial % 2:
            d[:, :8] = rng.integers(0, 3, (n, 1), dtype=np.uint8)  # many equal first words
        if trial % 3 == 0:
            d[:, 8:16] = 0  # equal second words too
        copies = int(rng.integers(0, n))
        d[rng.integers(0, n, copies)] = d[rng.integers(0, n, copies)]
        _, expected = np.unique(d.view(np.dtype((np.void, 32))).reshape(-1), return_inverse=True)
        assert digest_ids(d).tolist() == expected.reshape(-1).tolist(), trial
