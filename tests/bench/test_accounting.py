"""Unit tests of the histogram and the sequence ledger."""

from __future__ import annotations

import random

from shoal.bench.histogram import LatencyHistogram
from shoal.bench.ledger import SequenceLedger


def test_ledger_classifies_gap_duplicate_and_reordering() -> None:
    ledger = SequenceLedger()
    fresh = [ledger.record(1, 0, seq) for seq in (0, 1, 3, 4, 4, 2, 6)]
    assert fresh == [True, True, True, True, False, True, True]
    totals = ledger.report().streams[(1, 0)]
    # 2 arrived late (a reordering, not a loss); 5 never arrived.
    assert totals.unique == 6
    assert totals.duplicates == 1
    assert totals.reorders == 1
    assert totals.gap_events == 2
    report = ledger.report()
    assert report.gap_examples[0] == {"receiver": 1, "source": 0, "expected": 2, "got": 3}
    assert report.duplicate_examples == [{"receiver": 1, "source": 0, "seq": 4}]
    assert report.reorder_examples == [{"receiver": 1, "source": 0, "seq": 2, "after": 4}]


def test_ledger_streams_are_independent() -> None:
    ledger = SequenceLedger()
    for seq in range(3):
        ledger.record(1, 0, seq)
        ledger.record(2, 0, seq)
        ledger.record(1, 5, seq)
    assert ledger.unique(1, 0) == ledger.unique(2, 0) == ledger.unique(1, 5) == 3
    assert ledger.unique(3, 0) == 0
    assert all(t.gap_events == 0 for t in ledger.report().streams.values())


def test_histogram_percentiles_within_one_percent() -> None:
    rng = random.Random(7)
    samples = [int(rng.lognormvariate(12, 1.5)) + 1 for _ in range(20_000)]
    left, right = LatencyHistogram(), LatencyHistogram()
    for k, value in enumerate(samples):
        (left if k % 2 else right).record(value)
    left.merge(right)
    samples.sort()
    assert left.count == len(samples)
    assert left.maximum == samples[-1]
    assert left.minimum == samples[0]
    for p in (50, 90, 99, 99.9):
        exact = samples[int(len(samples) * p / 100) - 1]
        assert abs(left.percentile(p) - exact) <= 0.01 * exact
    assert left.percentile(100) == samples[-1]


def test_empty_histogram() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile(99) == 0.0
    assert histogram.mean() == 0.0
    assert histogram.distribution() == []
