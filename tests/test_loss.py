"""bcc.loss: masked multitask cross-entropy checked against a hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from bcc.loss import MultitaskLoss, inverse_frequency_weights

BINARY_LOGITS = [[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0], [0.0, 1.0]]
BINARY_TARGETS = [0, 1, 1, 1]
SUBTYPE_LOGITS = [[1.0, 0.0, -1.0], [0.2, 0.3, 0.1], [-2.0, 1.0, 0.5], [0.0, 0.0, 2.0]]
SUBTYPE_TARGETS = [-1, 0, 2, 1]  # the first sample is benign: no subtype


def log_softmax(row):
    m = max(row)
    log_z = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - log_z for v in row]


def hand_ce(rows, targets, weights=None, smoothing=0.0):
    """Weighted mean over valid rows of (1-e) w_y (-log p_y) + e/C sum_c w_c (-log p_c)."""
    num = den = 0.0
    for row, y in zip(rows, targets, strict=True):
        if y == -1:
            continue
        c = len(row)
        w = weights or [1.0] * c
        lp = log_softmax(row)
        num += (1 - smoothing) * w[y] * -lp[y] + smoothing / c * sum(w[k] * -lp[k] for k in range(c))
        den += w[y]
    return num / den if den else 0.0


def batch():
    logits = [
        torch.tensor(BINARY_LOGITS, requires_grad=True),
        torch.tensor(SUBTYPE_LOGITS, requires_grad=True),
    ]
    targets = {"binary": torch.tensor(BINARY_TARGETS), "subtype": torch.tensor(SUBTYPE_TARGETS)}
    return logits, targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_hand_computation(smoothing, weighted):
    binary_w, subtype_w = ([0.7, 1.5], [2.0, 0.5, 1.25]) if weighted else (None, None)
    class_weights = {
        "binary": binary_w and torch.tensor(binary_w),
        "subtype": subtype_w and torch.tensor(subtype_w),
    }
    loss_fn = MultitaskLoss(
        ["binary", "subtype"],
        head_weights={"subtype": 0.5},
        class_weights=class_weights,
        label_smoothing=smoothing,
    )
    logits, targets = batch()
    total, per_head = loss_fn(logits, targets)

    expected_binary = hand_ce(BINARY_LOGITS, BINARY_TARGETS, binary_w, smoothing)
    expected_subtype = hand_ce(SUBTYPE_LOGITS, SUBTYPE_TARGETS, subtype_w, smoothing)
    assert per_head["binary"].item() == pytest.approx(expected_binary, rel=1e-6)
    assert per_head["subtype"].item() == pytest.approx(expected_subtype, rel=1e-6)
    assert total.item() == pytest.approx(expected_binary + 0.5 * expected_subtype, rel=1e-6)
    assert not per_head["binary"].requires_grad
    # Same as torch's own mean reduction, which the docstring promises.
    reference = F.cross_entropy(
        logits[1],
        targets["subtype"],
        weight=class_weights["subtype"],
        ignore_index=-1,
        label_smoothing=smoothing,
    )
    assert per_head["subtype"].item() == pytest.approx(reference.item(), rel=1e-6)
    total.backward()
    assert logits[1].grad[0].abs().sum() == 0  # the benign sample gets no subtype gradient


def test_all_benign_batch_has_zero_subtype_loss():
    loss_fn = MultitaskLoss(
        ["binary", "subtype"], class_weights={"subtype": torch.tensor([1.0, 2.0, 3.0])}, label_smoothing=0.1
    )
    binary = torch.randn(3, 2, requires_grad=True)
    subtype = torch.randn(3, 3, requires_grad=True)
    targets = {"binary": torch.zeros(3, dtype=torch.long), "subtype": torch.full((3,), -1)}
    total, per_head = loss_fn([binary, subtype], targets)
    assert per_head["subtype"].item() == 0.0
    assert torch.isfinite(total) and total.grad_fn is not None
    total.backward()
    # Connected to the subtype logits (DDP needs every head in the graph) with a zero gradient.
    assert subtype.grad is not None and torch.equal(subtype.grad, torch.zeros_like(subtype))
    assert binary.grad.abs().sum() > 0

    only_subtype = MultitaskLoss(["subtype"])
    empty, _ = only_subtype([subtype], {"subtype": torch.full((3,), -1)})
    assert empty.item() == 0.0 and empty.grad_fn is not None


def test_input_validation():
    with pytest.raises(ValueError, match="unknown heads"):
        MultitaskLoss(["binary"], head_weights={"subtyp": 1.0})
    with pytest.raises(ValueError, match="unknown heads"):
        MultitaskLoss(["binary"], class_weights={"other": torch.ones(2)})
    loss_fn = MultitaskLoss(["binary", "subtype"])
    logits, targets = batch()
    with pytest.raises(KeyError, match="subtype"):
        loss_fn(logits, {"binary": targets["binary"]})
    with pytest.raises(ValueError, match="2 logits"):
        MultitaskLoss(["binary"])(logits, targets)


def test_class_weights_follow_the_module():
    loss_fn = MultitaskLoss(["binary"], class_weights={"binary": torch.tensor([1.0, 3.0])})
    assert "class_weight_0" in dict(loss_fn.named_buffers())
    loss_fn.to(torch.float64)
    assert loss_fn.class_weight("binary").dtype == torch.float64


def test_inverse_frequency_weights():
    counts = [10, 30, 60]
    w = inverse_frequency_weights(counts)
    assert w.tolist() == pytest.approx([100 / 30, 100 / 90, 100 / 180])
    assert sum(n * wc for n, wc in zip(counts, w.tolist(), strict=True)) / sum(counts) == pytest.approx(1.0)
    assert inverse_frequency_weights([5, 5]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="class index 1"):
        inverse_frequency_weights([4, 0, 2])
