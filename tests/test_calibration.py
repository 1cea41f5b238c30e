import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from bcc.calibration import apply_temperature, ece, fit_temperature, fit_temperatures
from bcc.taxonomy import Taxonomy


def overconfident(n=600, k=3, seed=0):
    """Logits that rank well (~80% top-1) but are scaled 5x: far too confident."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), targets] += 1.6
    return 5 * logits, targets


def test_temperature_above_one_and_ece_does_not_grow():
    logits, targets = overconfident()
    t = fit_temperature(logits, targets)
    assert t > 1.5
    before = ece(torch.softmax(logits, 1), targets)
    after = ece(torch.softmax(logits / t, 1), targets)
    assert after <= before and after < 0.5 * before


def test_ece_agrees_with_torchmetrics():
    logits, targets = overconfident(seed=1)
    probs = torch.softmax(logits / 3, 1)
    ours = ece(probs, targets, n_bins=15)
    theirs = multiclass_calibration_error(probs, targets, num_classes=3, n_bins=15, norm="l1").item()
    assert abs(ours - theirs) < 1e-6


def test_ignored_targets_and_per_head_temperatures():
    logits, targets = overconfident(n=200, k=2)
    targets[:50] = -1
    assert fit_temperature(logits[:50], targets[:50]) == 1.0  # nothing valid: no change
    tax = Taxonomy.default()
    labels = torch.randint(0, 4, (200,))
    temps = fit_temperatures(tax, (logits, torch.randn(200, 3)), labels)
    assert set(temps) == {"binary", "subtype"} and all(t > 0 for t in temps.values())
    scaled = apply_temperature((logits, logits[:, :1].repeat(1, 3)), {"binary": 2.0}, tax.head_names)
    assert torch.allclose(scaled[0], logits / 2) and torch.equal(scaled[1], logits[:, :1].repeat(1, 3))
