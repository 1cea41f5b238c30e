import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bcc.metrics import EvalMetrics, combined_probs, format_table
from bcc.taxonomy import Taxonomy

TAX = Taxonomy.default()  # classes: Benign, early Pre-B, Pre-B, Pro-B


def logits_for(binary: list[int], subtype: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident logits that decide the given labels."""
    b = torch.full((len(binary), 2), -3.0)
    b[range(len(binary)), binary] = 3.0
    s = torch.full((len(subtype), 3), -3.0)
    s[range(len(subtype)), subtype] = 3.0
    return b, s


# labels:        Benign Benign early  Pre   Pro   Pro
LABELS = torch.tensor([0, 0, 1, 2, 3, 3])
# binary says:   B      M      M      M     M     B      (one benign missed, one malignant missed)
# subtype says:  Pro    Pre    early  Pro   Pro   Pro    (sample 1's subtype must not matter: decided benign)
BINARY = [0, 1, 1, 1, 1, 0]
SUBTYPE = [2, 1, 0, 2, 2, 2]


def test_hand_computed_metrics():
    m = EvalMetrics(TAX)
    m.update(logits_for(BINARY, SUBTYPE), LABELS, loss_sum=torch.tensor(3.0))
    out = m.compute()
    # combined decision: 0->Benign, 1->Pre-B, 2->early, 3->Pro (wrong), 4->Pro, 5->Benign (wrong)
    assert out["confusion"] == [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1]]
    assert out["acc"] == pytest.approx(3 / 6) and out["acc4"] == out["acc"]
    assert out["bacc4"] == pytest.approx((1 / 2 + 1 + 0 + 1 / 2) / 4)
    # binary head: positives (malignant) = samples 2..5; predicted positive = 1..4
    assert out["binary_sens"] == pytest.approx(3 / 4)
    assert out["binary_spec"] == pytest.approx(1 / 2)
    assert out["binary_bacc"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    # subtype head: only the truly malignant samples 2..5 (targets 0,1,2,2), predictions 0,2,2,2
    assert out["subtype_count"] == 4
    assert out["subtype_acc"] == pytest.approx(3 / 4)
    assert out["subtype_f1"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert out["count"] == 6 and out["loss"] == pytest.approx(0.5)


def test_combined_probs_are_hierarchical_and_sum_to_one():
    b = torch.tensor([[0.0, math.log(3.0)]])  # P(malignant) = 0.75
    s = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    p = combined_probs(TAX, (b, s))
    assert torch.allclose(p, torch.tensor([[0.25, 0.15, 0.225, 0.375]]), atol=1e-6)


def test_head_without_valid_targets_gives_nan_not_a_crash():
    m = EvalMetrics(TAX)
    m.update(logits_for([0, 0], [1, 2]), torch.tensor([0, 0]))
    out = m.compute()
    assert out["subtype_count"] == 0 and math.isnan(out["subtype_acc"])
    assert out["acc"] == 1.0
    assert format_table(out, "t").row_count >= 2  # the table renders NaN cells too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, splits, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    m = EvalMetrics(TAX)
    idx = splits[rank]
    if idx:
        b, s = logits_for([BINARY[i] for i in idx], [SUBTYPE[i] for i in idx])
        m.update((b, s), LABELS[idx], loss_sum=torch.tensor(float(len(idx))))
    out = m.compute()
    queue.put((rank, out))
    dist.destroy_process_group()


@pytest.mark.parametrize("splits", [([0, 1, 2, 3], [4, 5]), ([0, 1, 2, 3, 4, 5], [])], ids=["uneven", "zero"])
def test_two_process_sync_equals_single_process(splits):
    single = EvalMetrics(TAX)
    single.update(logits_for(BINARY, SUBTYPE), LABELS, loss_sum=torch.tensor(6.0))
    expected = single.compute()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_rank_main, args=(_free_port(), splits, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get(timeout=60) for _ in range(2))
    for rank in (0, 1):
        got = results[rank]
        assert got["count"] == 6
        for key, value in expected.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[key]), key
            elif isinstance(value, list):
                assert got[key] == value, key
            else:
                assert got[key] == pytest.approx(value), key
