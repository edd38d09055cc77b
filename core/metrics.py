"""The counters of every process of a node, summed in shared memory for `/metrics`.

Each process counts in plain Python ints, in its own memory (`counters`): the hot path
pays one attribute or dict item increment per event, and counts in bulk where it can
(one `deliveries += n` per fan-out, not one per recipient). No lock, no system call, no
memory shared with another process is touched there.

Once a second (the beat, `shoal.core.loops.beat`), and right before a worker answers
`/metrics`, a process copies its totals into its own row of the node's shared memory
(`Metrics.publish()`). The master allocates that memory before forking, one row per
scoreboard seat plus a retired row, and reaches every child with the scoreboard
(`Scoreboard.metrics`). Whoever answers `/metrics` sums the rows (`Metrics.totals()`).

When a child exits, the master adds its row into the retired row and zeroes it
(`Metrics.fold()`, from `Scoreboard.release()`), so node totals never go backwards when
a worker is replaced. A child killed with SIGKILL loses what it counted since its last
publication: at most a second. The master counts what only it knows (restarts,
reloads) straight into the retired row.

Why not prometheus-client's multiprocess mode: it writes an mmap'd file per process and
takes a lock on every `inc()`, a cost on every message.

Label values are fixed ahead, so that neither a client nor an application can grow the
number of series: a value outside them counts as "other".
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from typing import Any, Literal

from websockets.frames import CloseCode as RfcCloseCode

from shoal.core.schema import CLIENT_TYPES, SERVER_TYPES, CloseCode

Kind = Literal["counter", "gauge", "histogram", "summary"]

OTHER = "other"
# Messages an application takes or sends unparsed (`on_frame`, `send_text`, `send_bytes`).
TEXT = "text"
BINARY = "binary"

CLOSE_CODES = (*(str(code) for code in sorted({*CloseCode, *RfcCloseCode})), OTHER)
TYPES_IN = (*CLIENT_TYPES, TEXT, BINARY, OTHER)
TYPES_OUT = (*SERVER_TYPES, TEXT, BINARY, OTHER)
PROTOCOL_ERRORS = ("message", "frame")
REDIS_ERRORS = ("connect", "lost", "busy")
REFUSALS = (
    *("unauthorized", "banned", "invalid", "unavailable"),
    *("connections_per_ip", "connections_per_ip_per_minute"),
)
HTTP_STATUSES = (
    *("200", "400", "401", "403", "404", "405", "408", "413", "431", "500", "501", "503"),
    OTHER,
)
TASK_OUTCOMES = ("ok", "failed", "timeout", "abandoned")
TASK_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0)
RESTART_REASONS = ("crashed", "stuck", "reload", "max_request", "scale")
RELOAD_OUTCOMES = ("ok", "failed")
_INF = "+Inf"
_SUM = "sum"
_COUNT = "count"
TASK_RUN_COLUMNS = (*(str(bound) for bound in TASK_BUCKETS), _INF, _SUM)

# Close codes a server sends when the client broke the WebSocket protocol itself.
FRAME_ERRORS = frozenset(
    {RfcCloseCode.PROTOCOL_ERROR, RfcCloseCode.INVALID_DATA, RfcCloseCode.MESSAGE_TOO_BIG}
)


@dataclass(frozen=True, slots=True)
class Family:
    """One metric, exposed as `shoal_<name>` (counters with `_total`).

    Attributes:
        label: the name of its one label, "" for none.
        values: its label values; a histogram's bucket bounds then "sum"; a summary's
            "count" and "sum". One column of the shared memory each (one if none).
    """

    name: str
    kind: Kind
    help: str
    label: str = ""
    values: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return len(self.values) or 1


# What each process counts, in `Counters`' attributes of the same names.
PROCESS_FAMILIES = (
    Family("connections_opened", "counter", "WebSocket connections whose opening handshake completed."),
    Family("connections_closed", "counter", "WebSocket connections gone, by the code of the close frame that began their closing handshake (1006: none).", "code", CLOSE_CODES),
    Family("messages_in", "counter", "Messages received from clients, by JSON type (text, binary: taken unparsed by the application).", "type", TYPES_IN),
    Family("messages_out", "counter", "Messages sent to one client, by JSON type; fan-out deliveries are counted in shoal_deliveries_total.", "type", TYPES_OUT),
    Family("bytes_in", "counter", "Bytes read from client sockets, handshakes and HTTP requests included."),
    Family("bytes_out", "counter", "Bytes written to client sockets, handshakes and HTTP responses included."),
    Family("deliveries", "counter", "Copies of published messages (rooms, channels, broadcasts, users) written to local recipients."),
    Family("slow_consumers", "counter", "Connections closed with 4000 because too much data waited to be sent to them."),
    Family("protocol_errors", "counter", "Client errors: a message the application refused (message); a broken WebSocket frame or message (frame).", "kind", PROTOCOL_ERRORS),
    Family("handshakes_refused", "counter", "WebSocket handshakes refused by shoal, by reason: no valid token (unauthorized, 401), a banned user (banned, 403), an invalid user_id (invalid, 400), Redis or signing keys unavailable (unavailable, 503), a client address over limits.connections_per_ip or limits.connections_per_ip_per_minute (429).", "reason", REFUSALS),
    Family("redis_errors", "counter", "Redis failures: a connection attempt failed (connect), an open connection broke or stopped answering (lost), Redis answered BUSY or LOADING (busy).", "kind", REDIS_ERRORS),
    Family("redis_reconnects", "counter", "Redis connections opened again after one was lost."),
    Family("rate_limited", "counter", "Client messages refused by the per-connection rate limits (limits.messages_per_second, limits.bytes_per_second)."),
    Family("publish_waits", "counter", "Times a client's publish made its connection wait because Redis was behind (limits.publish_backlog, limits.subscriber_backlog)."),
    Family("http_requests", "counter", "Plain HTTP requests the workers answered, by status: the Pusher HTTP API's, and every request that is not a GET.", "status", HTTP_STATUSES),
    Family("tasks", "counter", "Task jobs that ended in this node's task pool, by outcome.", "outcome", TASK_OUTCOMES),
    Family("task_run_seconds", "histogram", "Time each run of a task job took in a task process, retries included.", "", TASK_RUN_COLUMNS),
    Family("task_queue_depth", "gauge", "Task jobs queued or running in the whole deployment (the length of the tasks stream), read every few seconds."),
)  # fmt: skip
# What the master counts, straight into the retired row.
MASTER_FAMILIES = (
    Family("worker_restarts", "counter", "Child processes the master replaced, by reason.", "reason", RESTART_REASONS),
    Family("reloads", "counter", "Reloads of the node, by outcome.", "outcome", RELOAD_OUTCOMES),
    Family("reload_duration_seconds", "summary", "How long reloads took, from the reload signal until the last old worker was told to retire (or the reload was given up).", "", (_COUNT, _SUM)),
)  # fmt: skip
FAMILIES = (*PROCESS_FAMILIES, *MASTER_FAMILIES)


def _offsets() -> dict[str, int]:
    """Where each family's columns start in a row."""
    offsets: dict[str, int] = {}
    column = 0
    for family in FAMILIES:
        offsets[family.name] = column
        column += family.width
    return offsets


_OFFSETS = _offsets()
COLUMNS = sum(family.width for family in FAMILIES)
PROCESS_COLUMNS = sum(family.width for family in PROCESS_FAMILIES)
_GAUGES = [_OFFSETS[family.name] for family in FAMILIES if family.kind == "gauge"]  # one column
_SUMMED = [column for column in range(COLUMNS) if column not in _GAUGES]


class Counters:
    """What one process counted since it started, in its own memory.

    Labelled counters are dicts holding every label value from the start: a count for a
    value outside them is an `OTHER` one, as in
    `try: d[key] += 1` / `except KeyError: d[OTHER] += 1`, which never adds a key.
    """

    __slots__ = tuple(family.name for family in PROCESS_FAMILIES)

    def __init__(self) -> None:
        self.connections_opened = 0
        self.connections_closed = dict.fromkeys(CLOSE_CODES, 0)
        self.messages_in = dict.fromkeys(TYPES_IN, 0)
        self.messages_out = dict.fromkeys(TYPES_OUT, 0)
        self.bytes_in = 0
        self.bytes_out = 0
        self.deliveries = 0
        self.slow_consumers = 0
        self.protocol_errors = dict.fromkeys(PROTOCOL_ERRORS, 0)
        self.handshakes_refused = dict.fromkeys(REFUSALS, 0)
        self.redis_errors = dict.fromkeys(REDIS_ERRORS, 0)
        self.redis_reconnects = 0
        self.rate_limited = 0
        self.publish_waits = 0
        self.http_requests = dict.fromkeys(HTTP_STATUSES, 0)
        self.tasks = dict.fromkeys(TASK_OUTCOMES, 0)
        # Cumulative, as Prometheus buckets are: a run counts in every bucket it fits.
        self.task_run_seconds = dict.fromkeys(TASK_RUN_COLUMNS, 0.0)
        self.task_queue_depth = 0

    def closed(self, code: int) -> None:
        """A connection closed with `code`."""
        try:
            self.connections_closed[str(code)] += 1
        except KeyError:
            self.connections_closed[OTHER] += 1

    def answered(self, status: int) -> None:
        """A plain HTTP request was answered with `status`."""
        try:
            self.http_requests[str(status)] += 1
        except KeyError:
            self.http_requests[OTHER] += 1

    def sent(self, kind: Any) -> None:
        """A message of JSON type `kind` went to one client.

        No exception for a type outside the schema: applications send their own types
        on every message, and raising costs a microsecond.
        """
        sent = self.messages_out
        try:
            sent[kind if kind in sent else OTHER] += 1
        except TypeError:  # an unhashable "type"
            sent[OTHER] += 1

    def ran(self, seconds: float) -> None:
        """A task run took `seconds`."""
        buckets = self.task_run_seconds
        for bound, key in zip(TASK_BUCKETS, TASK_RUN_COLUMNS, strict=False):
            if seconds <= bound:
                buckets[key] += 1
        buckets[_INF] += 1
        buckets[_SUM] += seconds

    def row(self) -> list[float]:
        """Every count, in the columns' order."""
        values: list[float] = []
        for family in PROCESS_FAMILIES:
            value = getattr(self, family.name)
            if family.values:
                values += value.values()  # the keys never change, so neither does the order
            else:
                values.append(value)
        return values


counters = Counters()
"""This process's counters. Each child of the master publishes its own; the master
counts nothing here (it would hand its counts to every child it forks)."""

_FOLDING_TRIES = 200
_FOLDING_WAIT = 0.0001


class Metrics:
    """The node's counters in shared memory: a row of `COLUMNS` per seat, plus the
    retired row. Each child writes only its own row; the master writes the retired one
    and folds rows into it.

    Args:
        seats: the scoreboard's seats.
    """

    def __init__(self, seats: int) -> None:
        self.seats = seats
        self._cells: Any = RawArray(ctypes.c_double, (seats + 1) * COLUMNS)
        # Odd while the master folds a row: a reader then retries, so that it never sees
        # a row both folded and not (a total going up, then down).
        self._folds: Any = RawArray(ctypes.c_int64, 1)
        self._retired = seats * COLUMNS

    # Children

    def publish(self, seat: int, counts: Counters) -> None:
        """Child: copy `counts` into my row."""
        start = seat * COLUMNS
        self._cells[start : start + PROCESS_COLUMNS] = counts.row()

    # The master

    def fold(self, seat: int) -> None:
        """Master: the child in `seat` is gone; add its counts into the retired row and
        zero its row for the next child. Its gauges are dropped, not added."""
        cells = self._cells
        start = seat * COLUMNS
        retired = self._retired
        self._folds[0] += 1
        for column in _SUMMED:
            cells[retired + column] += cells[start + column]
        cells[start : start + COLUMNS] = [0.0] * COLUMNS
        self._folds[0] += 1

    def count_restart(self, reason: str) -> None:
        """Master: it replaced a child, for `reason` (one of `RESTART_REASONS`).

        Raises:
            ValueError: an unknown reason.
        """
        if reason not in RESTART_REASONS:
            raise ValueError(f"unknown restart reason {reason!r}: not one of {RESTART_REASONS}")
        self._add("worker_restarts", RESTART_REASONS.index(reason), 1)

    def count_reload(self, seconds: float, ok: bool) -> None:
        """Master: a reload ended after `seconds`, successfully or not."""
        self._add("reloads", RELOAD_OUTCOMES.index("ok" if ok else "failed"), 1)
        self._add("reload_duration_seconds", 0, 1)
        self._add("reload_duration_seconds", 1, seconds)

    def _add(self, family: str, index: int, amount: float) -> None:
        self._cells[self._retired + _OFFSETS[family] + index] += amount

    # Readers

    def messages_in(self, seat: int) -> int:
        """Messages the child in `seat` received from its clients, as it last published."""
        start = seat * COLUMNS + _OFFSETS["messages_in"]
        return int(sum(self._cells[start : start + len(TYPES_IN)]))

    def totals(self) -> list[float]:
        """The node's totals, one per column: counters summed over every row, gauges
        the largest of any seat's."""
        for _ in range(_FOLDING_TRIES):
            before = self._folds[0]
            if not before % 2:
                cells = self._cells[:]
                if self._folds[0] == before:
                    break
            time.sleep(_FOLDING_WAIT)  # the master may be off the CPU mid-fold
        else:  # the master died while folding: its children are going anyway
            cells = self._cells[:]
        totals = [0.0] * COLUMNS
        for row in range(self.seats + 1):
            start = row * COLUMNS
            for column in _SUMMED:
                totals[column] += cells[start + column]
            for column in _GAUGES:
                totals[column] = max(totals[column], cells[start + column])
        return totals


def split(totals: list[float]) -> list[tuple[Family, list[float]]]:
    """`totals` by family, each with its columns' values (in `Family.values` order)."""
    return [
        (family, totals[_OFFSETS[family.name] : _OFFSETS[family.name] + family.width])
        for family in FAMILIES
    ]
