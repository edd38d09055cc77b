"""Counts and latencies inside the measured window, plus a whole-run timeline.

All times are ``time.monotonic_ns()`` values, which Linux shares across
processes, so a send timestamp taken in one load process can be compared with
a receive time taken in another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.bench.histogram import LatencyHistogram


@dataclass
class MeterReport:
    """Picklable totals of one or more meters (merged by addition)."""

    sent: int = 0
    received: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    timeline: list[int] = field(default_factory=list)

    def merge(self, other: MeterReport) -> None:
        """Add another process's totals in."""
        self.sent += other.sent
        self.received += other.received
        self.latency.merge(other.latency)
        if len(other.timeline) > len(self.timeline):
            self.timeline.extend([0] * (len(other.timeline) - len(self.timeline)))
        for i, n in enumerate(other.timeline):
            self.timeline[i] += n


class Meter:
    """Records sends and receipts; only the window [warmup end, run end) is measured."""

    def __init__(self, t0_ns: int, warmup_s: float, duration_s: float, step_ns: int) -> None:
        self.t0 = t0_ns
        self.window_start = t0_ns + int(warmup_s * 1e9)
        self.window_end = self.window_start + int(duration_s * 1e9)
        self.step = step_ns
        self.sent_total = 0
        self.received_total = 0
        self._report = MeterReport()

    def on_send(self, now: int) -> None:
        """Count one message sent at ``now``."""
        self.sent_total += 1
        if self.window_start <= now < self.window_end:
            self._report.sent += 1

    def on_receive(self, now: int, sent_at: int) -> None:
        """Count one message received at ``now`` that was sent at ``sent_at``."""
        self.received_total += 1
        report = self._report
        slot = (now - self.t0) // self.step
        if slot >= 0:
            timeline = report.timeline
            if slot >= len(timeline):
                timeline.extend([0] * (slot + 1 - len(timeline)))
            timeline[slot] += 1
        if self.window_start <= now < self.window_end:
            report.received += 1
            report.latency.record(now - sent_at)

    def report(self) -> MeterReport:
        """The measured totals."""
        return self._report
