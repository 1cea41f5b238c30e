"""bcc.calibration: temperature scaling fixes an over-confident model; ECE agrees with torchmetrics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.functional.classification import multiclass_calibration_error

from bcc.calibration import apply_temperature, ece, fit_temperature, fit_temperatures, reliability_bins
from bcc.taxonomy import Taxonomy


def calibrated_logits(n=4000, k=3, margin=1.6, seed=0):
    """x = margin * onehot(y) + N(0, 1): the exact posterior is softmax(margin * x), ~80% accurate."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = margin * F.one_hot(y, k) + torch.randn(n, k, generator=g)
    return margin * x, y


def test_overconfident_model_gets_temperature_above_one():
    logits, y = calibrated_logits()
    accuracy = (logits.argmax(1) == y).float().mean()
    assert 0.75 < accuracy < 0.85
    overconfident = 5 * logits
    t = fit_temperature(overconfident, y)
    assert 3.5 < t < 7.0  # the truth is 5
    before = ece(overconfident.softmax(1), y)
    after = ece((overconfident / t).softmax(1), y)
    assert after <= before
    assert after < 0.05 < before
    # accuracy is untouched
    assert torch.equal((overconfident / t).argmax(1), overconfident.argmax(1))


def test_calibrated_model_stays_near_one():
    logits, y = calibrated_logits(seed=1)
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.15)


def test_fit_ignores_invalid_targets_and_empty_input():
    logits, y = calibrated_logits(n=500)
    y_masked = y.clone()
    y_masked[::2] = -1
    assert fit_temperature(logits, y_masked) == pytest.approx(fit_temperature(logits[1::2], y[1::2]))
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_fit_temperatures_per_head_and_apply():
    tax = Taxonomy.default()
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (300,), generator=g)
    logits = (torch.randn(300, 2, generator=g) * 4, torch.randn(300, 3, generator=g) * 4)
    temps = fit_temperatures(tax, logits, labels)
    assert list(temps) == ["binary", "subtype"] and all(t > 0 for t in temps.values())
    scaled = apply_temperature(logits, temps)
    torch.testing.assert_close(scaled[0], logits[0] / temps["binary"])
    torch.testing.assert_close(scaled[1], logits[1] / temps["subtype"])
    # a head missing from the mapping keeps T = 1; a wrong count is an error
    same = apply_temperature(logits, {"binary": 2.0}, head_names=tax.head_names)
    torch.testing.assert_close(same[1], logits[1])
    with pytest.raises(ValueError, match="head_names"):
        apply_temperature(logits, {"binary": 2.0})
    with pytest.raises(ValueError, match="> 0"):
        apply_temperature(logits, {"binary": 0.0, "subtype": 1.0})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reliability_bins_agree_with_the_torchmetrics_ece(seed):
    """`ece` is torchmetrics'; the reliability diagram's bins must give the same number."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(997, 4, generator=g) * (1 + 6 * seed)  # seed 2: many confidences of exactly 1.0
    probs = logits.softmax(1)
    y = torch.randint(0, 4, (997,), generator=g)
    expected = multiclass_calibration_error(probs, y, 4, n_bins=15)
    assert ece(probs, y) == pytest.approx(float(expected), abs=1e-6)
    metric = MulticlassCalibrationError(4, n_bins=15)
    metric.update(probs[:500], y[:500])
    metric.update(probs[500:], y[500:])
    assert ece(probs, y) == pytest.approx(float(metric.compute()), abs=1e-6)
    assert ece(probs, y, n_bins=7) == pytest.approx(float(multiclass_calibration_error(probs, y, 4, n_bins=7)), abs=1e-6)
    for n_bins in (15, 7):
        acc, conf, count = reliability_bins(probs, y, n_bins)
        from_bins = float(((acc - conf).abs() * count).sum() / count.sum())
        assert from_bins == pytest.approx(ece(probs, y, n_bins), abs=1e-6)


def test_ece_of_nothing_is_nan():
    assert math.isnan(ece(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
