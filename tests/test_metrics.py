"""bcc.metrics: hand-checked values on a fixed batch, edge cases, and a real 2-process gloo sync."""

import math
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from torchmetrics.classification import MulticlassF1Score

from bcc.calibration import ece
from bcc.metrics import EvalMetrics, combined_probs, format_table, metric_names
from bcc.taxonomy import Taxonomy

BENIGN, EARLY, PRE, PRO = 0, 1, 2, 3

# (leaf label, binary logits, subtype logits, why)
BATCH = [
    (BENIGN, [2.0, 0.0], [0.0, 0.0, 5.0], "benign, right; subtype logits must not matter"),
    (BENIGN, [0.0, 2.0], [3.0, 0.0, 0.0], "benign called malignant -> early Pre-B"),
    (EARLY, [0.0, 3.0], [4.0, 0.0, 0.0], "right"),
    (EARLY, [1.0, 0.0], [4.0, 0.0, 0.0], "called benign: combined Benign, yet subtype head right"),
    (PRE, [0.0, 2.0], [0.0, 0.0, 3.0], "Pre-B called Pro-B"),
    (PRE, [0.0, 2.0], [0.0, 3.0, 0.0], "right"),
    (PRO, [0.0, 1.0], [0.0, 0.0, 2.0], "right"),
]


def batch(rows=BATCH):
    labels = torch.tensor([r[0] for r in rows], dtype=torch.long)
    binary = torch.tensor([r[1] for r in rows]).reshape(-1, 2)
    subtype = torch.tensor([r[2] for r in rows]).reshape(-1, 3)
    return (binary, subtype), labels


def mann_whitney_auroc(scores, positive):
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def assert_same(a: dict, b: dict, tol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), key
        elif isinstance(x, float):
            assert y == pytest.approx(x, abs=tol), key
        else:
            assert x == y, key


@pytest.fixture(scope="module")
def taxonomy():
    return Taxonomy.default()


def test_fixed_batch_matches_hand_computation(taxonomy):
    logits, labels = batch()
    m = EvalMetrics(taxonomy)
    m.update(logits, labels, loss_sum=3.5)
    r = m.compute()

    # combined: true [0,0,1,1,2,2,3], decided [0,1,1,0,3,2,3]
    assert r["confusion"] == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert r["acc"] == pytest.approx(4 / 7)
    assert r["bacc"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.0) / 4)
    assert "acc4" not in r and "bacc4" not in r  # names do not carry the class count
    assert r["f1"] == pytest.approx((0.5 + 0.5 + 2 / 3 + 2 / 3) / 4)
    assert r["ece"] == pytest.approx(ece(combined_probs(taxonomy, logits), labels), abs=1e-6)

    # binary: targets [0,0,1,1,1,1,1], predictions [0,1,1,0,1,1,1]
    assert r["binary_acc"] == pytest.approx(5 / 7)
    assert r["binary_sens"] == pytest.approx(4 / 5)
    assert r["binary_spec"] == pytest.approx(1 / 2)
    assert r["binary_bacc"] == pytest.approx((0.8 + 0.5) / 2)
    assert r["binary_auroc"] == pytest.approx(0.7)  # by hand: 7 of 10 (pos, neg) pairs ordered, ties 1/2
    assert r["binary_count"] == 7

    # subtype: only the 5 truly malignant samples; targets [0,0,1,1,2], predictions [0,0,2,1,2]
    assert r["subtype_count"] == 5
    assert r["subtype_acc"] == pytest.approx(4 / 5)
    assert r["subtype_bacc"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert r["subtype_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    sub_logits, sub_targets = logits[1][2:], torch.tensor([0, 0, 1, 1, 2])
    sub_probs = sub_logits.softmax(1)
    hand = [mann_whitney_auroc(sub_probs[:, k].tolist(), (sub_targets == k).tolist()) for k in range(3)]
    assert r["subtype_auroc"] == pytest.approx(sum(hand) / 3)
    assert "subtype_sens" not in r and "subtype_spec" not in r

    assert r["count"] == 7
    assert r["loss"] == pytest.approx(3.5 / 7)


def test_combined_probs_are_hierarchical(taxonomy):
    logits, _ = batch()
    probs = combined_probs(taxonomy, logits)
    pb, ps = logits[0].softmax(1), logits[1].softmax(1)
    expected = torch.cat([pb[:, :1], pb[:, 1:] * ps], dim=1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)))


def test_absent_class_bacc_over_present_classes(taxonomy):
    # drop the Pro-B sample: Pro-B is still predicted once (the Pre-B sample) but never true
    logits, labels = batch(BATCH[:-1])
    m = EvalMetrics(taxonomy)
    m.update(logits, labels)
    r = m.compute()
    assert r["bacc"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)  # torchmetrics' macro accuracy says 0.375
    # f1 follows torchmetrics (classes seen in targets or predictions; Pro-B scores 0)
    tm_f1 = MulticlassF1Score(4, average="macro")(taxonomy.decide(logits), labels)
    assert r["f1"] == pytest.approx(float(tm_f1))
    assert "loss" not in r


def test_head_without_valid_targets_is_nan(taxonomy):
    logits, labels = batch(BATCH[:2])  # benign only: no subtype target, one binary class
    m = EvalMetrics(taxonomy)
    m.update(logits, labels)
    r = m.compute()
    assert r["subtype_count"] == 0
    for key in ("subtype_acc", "subtype_bacc", "subtype_f1", "subtype_auroc", "subtype_ece"):
        assert math.isnan(r[key]), key
    assert math.isnan(r["binary_auroc"]) and math.isnan(r["binary_sens"])
    assert r["binary_spec"] == pytest.approx(0.5)
    assert r["count"] == 2


def test_empty_reset_and_accumulation(taxonomy):
    m = EvalMetrics(taxonomy)
    r = m.compute()  # nothing seen: NaN everywhere, no crash
    assert r["count"] == 0 and math.isnan(r["acc"]) and r["confusion"] == [[0] * 4] * 4
    logits, labels = batch()
    m.update(tuple(z[:0] for z in logits), labels[:0])  # an empty batch is fine too
    for i in range(0, len(labels), 3):  # several batches == one batch
        m.update(tuple(z[i : i + 3] for z in logits), labels[i : i + 3], loss_sum=torch.tensor(1.0))
    split = m.compute()
    m.reset()
    m.update(logits, labels, loss_sum=3.0)
    assert_same(split, m.compute())


def test_single_head_taxonomy():
    tax = Taxonomy.from_dict({"name": "three", "heads": [{"name": "kind", "labels": ["a", "b", "c"]}]})
    m = EvalMetrics(tax)
    logits = (torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 3.0, 0], [0, 0, 3.0]]),)
    m.update(logits, torch.tensor([0, 1, 2, 2]))
    r = m.compute()
    assert r["acc"] == r["kind_acc"] == pytest.approx(3 / 4)
    assert r["bacc"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert "kind_sens" not in r
    # the names a config may track are known before any evaluation, and are exactly compute()'s scalars
    assert set(metric_names(tax)) - {"loss"} == {k for k, v in r.items() if not isinstance(v, list)}


def test_metric_names_match_compute_for_the_default_taxonomy(taxonomy):
    m = EvalMetrics(taxonomy)
    logits, labels = batch()
    m.update(logits, labels, loss_sum=1.0)
    r = m.compute()
    assert set(metric_names(taxonomy)) == {k for k, v in r.items() if not isinstance(v, list)}
    assert "bacc" in metric_names(taxonomy) and "binary_bacc" in metric_names(taxonomy)


def test_format_table(taxonomy):
    logits, labels = batch()
    m = EvalMetrics(taxonomy)
    m.update(logits, labels, loss_sum=1.0)
    console = Console(record=True, width=120)
    console.print(format_table(m.compute(), title="val"))
    text = console.export_text()
    for word in ("combined", "binary", "subtype", "bacc", "0.5714", "loss"):
        assert word in text


def test_bad_input_is_a_clear_error(taxonomy):
    logits, labels = batch()
    m = EvalMetrics(taxonomy)
    with pytest.raises(ValueError, match="logit tensors"):
        m.update(logits[:1], labels)
    with pytest.raises(ValueError, match="leaf class"):
        m.update(logits, labels + 1)


# ---- two processes, gloo ------------------------------------------------------------------------

N_SYNC = 41
# name -> (samples of rank 0, all-benign data?) ; rank 1 gets the rest
SYNC_CASES = {"uneven": (27, False), "rank1_empty": (N_SYNC, False), "rank0_empty": (0, False),
              "benign_only_rank0_empty": (0, True)}


def sync_data(benign_only: bool):
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 4, (N_SYNC,), generator=g)
    if benign_only:
        labels = torch.zeros(N_SYNC, dtype=torch.long)
    # mildly informative logits so every metric is non-trivial
    table = Taxonomy.default().target_table()
    binary = torch.randn(N_SYNC, 2, generator=g) + 1.5 * torch.nn.functional.one_hot(table[labels, 0], 2)
    subtype = torch.randn(N_SYNC, 3, generator=g)
    subtype[table[labels, 1] >= 0] += 1.5 * torch.nn.functional.one_hot(table[labels, 1][table[labels, 1] >= 0], 3)
    return (binary, subtype), labels


def run_metrics(logits, labels, batch_size=4):
    m = EvalMetrics(Taxonomy.default())
    for i in range(0, len(labels), batch_size):
        chunk = tuple(z[i : i + batch_size] for z in logits)
        m.update(chunk, labels[i : i + batch_size], loss_sum=chunk[0].sum().item())
    return m.compute()


def _sync_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        for name, (split, benign_only) in SYNC_CASES.items():
            logits, labels = sync_data(benign_only)
            part = slice(0, split) if rank == 0 else slice(split, N_SYNC)
            results[name] = run_metrics(tuple(z[part] for z in logits), labels[part])
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_process_sync_equals_single_process(tmp_path):
    mp.spawn(_sync_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, (_, benign_only) in SYNC_CASES.items():
        single = run_metrics(*sync_data(benign_only))
        for rank in range(2):
            synced = per_rank[rank][name]
            assert synced["count"] == N_SYNC, (name, rank)
            assert_same(single, synced)
    assert math.isnan(per_rank[0]["benign_only_rank0_empty"]["subtype_acc"])


def test_table_titles_are_plain_text():
    """`val [big] after epoch 1`: rich markup would swallow `[big]` (the per-source tables lost their name)."""
    from rich.console import Console

    from bcc.metrics import format_table

    console = Console(record=True, width=100)
    console.print(format_table({"acc": 0.5, "count": 4}, "val [big] after epoch 1 [/tmp/x]"))
    assert "val [big] after epoch 1 [/tmp/x]" in console.export_text()
