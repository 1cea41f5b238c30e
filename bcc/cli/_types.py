"""argparse value types shared by the subcommands (a bad value is an error naming it)."""

from __future__ import annotations

import argparse


def _int_at_least(value: str, low: int, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return n


def positive_int(value: str) -> int:
    return _int_at_least(value, 1, "a positive integer")


def count(value: str) -> int:
    return _int_at_least(value, 0, "an integer >= 0")


def fold_count(value: str) -> int:
    """K of k-fold cross-validation (`--folds K`, K >= 2)."""
    n = positive_int(value)
    if n < 2:
        raise argparse.ArgumentTypeError(f"--folds needs K >= 2, got {value!r}")
    return n
