"""Per-stream sequence accounting: catches every gap, duplicate and reordering.

A *stream* is what one receiver gets from one source (a publisher, broadcaster
or private partner). Sources number their messages 0, 1, 2, ... so a receiver
can classify each arrival in O(1):

* ``seq == highest + 1``: in order.
* ``seq > highest + 1``: a gap; the skipped numbers are remembered as missing.
* ``seq`` is remembered as missing: it arrived late (a reordering).
* otherwise it was already seen: a duplicate.

Messages that never arrive at all (including a lost tail) are found at the end
by comparing each stream's unique count with what the source reports it sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Materialising a huge gap would exhaust memory if a payload were corrupted;
# beyond this the skipped numbers are counted but not tracked individually.
_MAX_TRACKED_GAP = 1_000_000

EXAMPLE_LIMIT = 5


class _Stream:
    __slots__ = ("duplicates", "gap_events", "highest", "missing", "reorders", "unique")

    def __init__(self) -> None:
        self.highest = -1
        self.unique = 0
        self.missing: set[int] = set()
        self.gap_events = 0
        self.duplicates = 0
        self.reorders = 0


@dataclass
class StreamTotals:
    """Final state of one (receiver, source) stream."""

    unique: int
    gap_events: int
    duplicates: int
    reorders: int


@dataclass
class LedgerReport:
    """Picklable summary of a ledger, merged by the parent process."""

    streams: dict[tuple[int, int], StreamTotals] = field(default_factory=dict)
    gap_examples: list[dict[str, int]] = field(default_factory=list)
    duplicate_examples: list[dict[str, int]] = field(default_factory=list)
    reorder_examples: list[dict[str, int]] = field(default_factory=list)

    def merge(self, other: LedgerReport) -> None:
        """Fold another process's report in (streams are disjoint per receiver)."""
        self.streams.update(other.streams)
        for mine, theirs in (
            (self.gap_examples, other.gap_examples),
            (self.duplicate_examples, other.duplicate_examples),
            (self.reorder_examples, other.reorder_examples),
        ):
            mine.extend(theirs[: max(0, EXAMPLE_LIMIT - len(mine))])


class SequenceLedger:
    """Classifies arrivals per (receiver, source) stream; see the module docstring."""

    def __init__(self) -> None:
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._report = LedgerReport()

    def record(self, receiver: int, source: int, seq: int) -> bool:
        """Account one arrival; True when it is a first arrival (not a duplicate)."""
        key = (receiver, source)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream()
        highest = stream.highest
        if seq == highest + 1:
            stream.highest = seq
            stream.unique += 1
            return True
        if seq > highest:
            stream.gap_events += 1
            if seq - highest - 1 <= _MAX_TRACKED_GAP:
                stream.missing.update(range(highest + 1, seq))
            self._example(
                self._report.gap_examples,
                receiver=receiver,
                source=source,
                expected=highest + 1,
                got=seq,
            )
            stream.highest = seq
            stream.unique += 1
            return True
        if seq in stream.missing:
            stream.missing.discard(seq)
            stream.reorders += 1
            stream.unique += 1
            self._example(
                self._report.reorder_examples,
                receiver=receiver,
                source=source,
                seq=seq,
                after=highest,
            )
            return True
        stream.duplicates += 1
        self._example(self._report.duplicate_examples, receiver=receiver, source=source, seq=seq)
        return False

    def report(self) -> LedgerReport:
        """Snapshot of every stream's totals plus the first few examples."""
        self._report.streams = {
            key: StreamTotals(s.unique, s.gap_events, s.duplicates, s.reorders)
            for key, s in self._streams.items()
        }
        return self._report

    def unique(self, receiver: int, source: int) -> int:
        """Distinct messages received so far on one stream."""
        stream = self._streams.get((receiver, source))
        return stream.unique if stream is not None else 0

    @staticmethod
    def _example(examples: list[dict[str, int]], **fields: int) -> None:
        if len(examples) < EXAMPLE_LIMIT:
            examples.append(fields)
