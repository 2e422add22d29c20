"""The agreement measure of tools/bench_estimate.py: Spearman's correlation with ties at their
average rank, the same without scipy as with it."""

from __future__ import annotations

import sys

import pytest

from launch import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_estimate  # noqa: E402 (after tools/ is on the path)


def test_tied_weights_take_their_average_rank():
    assert bench_estimate._average_ranks([0.0, 0.25, 0.0, 0.1875, 0.0]) == [2.0, 5.0, 2.0, 4.0, 2.0]


def test_the_fallback_is_scipys_spearman(monkeypatch):
    scipy_stats = pytest.importorskip("scipy.stats")
    x = [0.0, 0.0, 0.109, 0.1875, 0.25, 0.0, 0.234, 0.109, 0.0]
    y = [0.0, 0.109, 0.0, 0.25, 0.25, 0.0, 0.1875, 0.0, 0.109]
    expected = scipy_stats.spearmanr(x, y)[0]
    assert bench_estimate.spearman(x, y) == pytest.approx(expected)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import ...` now fails
    assert bench_estimate.spearman(x, y) == pytest.approx(expected, abs=1e-12)
