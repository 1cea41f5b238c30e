"""bcc.split: validated fractions, and units (duplicates, regex groups) that never straddle splits."""

from __future__ import annotations

import pytest

from bcc.errors import BccError
from bcc.split import SplitError, assign_splits, compile_group_regex, largest_remainder, parse_split


def test_parse_split_and_group_regex_are_validated():
    assert parse_split("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("0.8,0.1", "a,b,c", "0.5,0.5,0.5", "0,0.5,0.5", "-0.1,0.6,0.5"):
        with pytest.raises(SplitError):
            parse_split(bad)
    with pytest.raises(BccError, match="capturing group"):
        compile_group_regex("P\\d+")
    assert largest_remainder(10, (0.8, 0.1, 0.1)) == [8, 1, 1]
    assert sum(largest_remainder(7, (0.5, 0.25, 0.25))) == 7


def test_units_stay_together_and_the_split_is_seeded():
    samples = [{"sha256": f"h{i}", "source": f"Benign/P{i % 10}_{i}.jpg", "label": i % 2} for i in range(100)]
    samples[5]["sha256"] = samples[50]["sha256"]  # a duplicate pair in two patients: joins them
    rx = compile_group_regex(r"^(P\d+)_")
    assignment, unmatched, _ = assign_splits(samples, (0.6, 0.2, 0.2), 3, rx)
    assert unmatched == 0
    by_patient = {}
    for s, a in zip(samples, assignment, strict=True):
        by_patient.setdefault(s["source"].split("/")[1].split("_")[0], set()).add(a)
    assert all(len(v) == 1 for v in by_patient.values())
    assert by_patient["P5"] == by_patient["P0"]  # samples 5 (P5) and 50 (P0) are identical files
    assert assign_splits(samples, (0.6, 0.2, 0.2), 3, rx)[0] == assignment


def test_group_scope_class_keeps_ids_per_class_folder_and_a_giant_unit_is_warned_about():
    import numpy as np

    from bcc.split import big_unit_warning, join_units

    # augmented copies numbered per class: `_<source>_<n>`, the same source ids in every class folder
    names = [f"{c}/_{i % 50}_{i}.jpeg" for c in ("EOS", "LYM") for i in range(200)]
    exact = np.arange(len(names))
    rx = compile_group_regex(r"^_(\d+)_")
    per_dataset, _, _ = join_units(exact, names, rx)
    per_class, unmatched, _ = join_units(exact, names, rx, group_scope="class")
    assert unmatched == 0
    assert len(set(per_dataset.tolist())) == 50 and len(set(per_class.tolist())) == 100
    assert all(names[r].split("/")[0] == n.split("/")[0] for r, n in zip(per_class.tolist(), names, strict=True))
    with pytest.raises(SplitError, match="group scope must be one of dataset, class"):
        join_units(exact, names, rx, group_scope="patient")

    assert big_unit_warning(per_class, (0.8, 0.1, 0.1), None, True) == []
    chained = np.zeros(len(names), dtype=np.int64)  # everything joined into one unit
    (msg,) = big_unit_warning(chained, (0.8, 0.1, 0.1), 6, True)
    assert "one group of 400 samples (100% of the images)" in msg and "--no-near-dup" in msg
