"""Compact log-bucket latency histogram (HDR-like) that merges across processes.

Contract: values are non-negative integers (nanoseconds by convention). Every
reported percentile is within 0.35 % of a recorded value's true magnitude,
because buckets grow geometrically by a factor of 2**(1/100); min and max are
exact. Histograms pickle cheaply (a sparse dict) and merge by addition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# 100 buckets per power of two: ratio 1.0069, so a bucket's geometric midpoint is
# within 0.35 % of anything that landed in it (the brief asks for ~1 %).
_BUCKETS_PER_OCTAVE = 100


@dataclass
class LatencyHistogram:
    """Sparse histogram of integer samples with exact count, sum, min and max."""

    counts: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total: int = 0
    minimum: int = 0
    maximum: int = 0

    def record(self, value: int) -> None:
        """Add one sample; negative values (clock skew) are clamped to 0."""
        value = max(value, 0)
        index = int(math.log2(value) * _BUCKETS_PER_OCTAVE) if value >= 1 else -1
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1
        if self.count == 0 or value < self.minimum:
            self.minimum = value
        self.maximum = max(self.maximum, value)
        self.count += 1
        self.total += value

    def merge(self, other: LatencyHistogram) -> None:
        """Add every sample of ``other`` into this histogram."""
        if other.count == 0:
            return
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.minimum = other.minimum if self.count == 0 else min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)
        self.count += other.count
        self.total += other.total

    def percentile(self, p: float) -> float:
        """Value at percentile ``p`` (0..100); 0.0 when empty."""
        if self.count == 0:
            return 0.0
        if p >= 100:
            return float(self.maximum)
        rank = max(1, math.ceil(self.count * p / 100.0))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(max(_midpoint(index), float(self.minimum)), float(self.maximum))
        return float(self.maximum)

    def mean(self) -> float:
        """Arithmetic mean of the samples; 0.0 when empty."""
        return self.total / self.count if self.count else 0.0

    def distribution(self) -> list[tuple[float, float]]:
        """(value, cumulative percent) per non-empty bucket, ascending; for charts."""
        points: list[tuple[float, float]] = []
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            value = min(max(_midpoint(index), float(self.minimum)), float(self.maximum))
            points.append((value, 100.0 * seen / self.count))
        return points


def _midpoint(index: int) -> float:
    if index < 0:
        return 0.0
    return float(2.0 ** ((index + 0.5) / _BUCKETS_PER_OCTAVE))
