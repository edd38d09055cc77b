"""Traffic drivers: what each scenario sends, and how replies are checked.

A driver runs inside one load process over that process's connections. The
worker calls ``start`` at the common start time, ``stop`` at the end of the
measured window, ``drain`` with the run-wide sent counts, then ``report``.
New scenarios register a driver class in :data:`DRIVERS`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from shoal.bench.client import Client
from shoal.bench.ledger import LedgerReport, SequenceLedger
from shoal.bench.meter import Meter, MeterReport
from shoal.bench.plan import RunPlan

_DRAIN_POLL_S = 0.01
# Paced senders wake this often; fine enough for rates up to ~100k msgs/s per process.
_TICK_S = 0.001


@dataclass
class DriverReport:
    """Picklable outcome of one process's traffic (merged by the parent)."""

    meter: MeterReport = field(default_factory=MeterReport)
    ledger: LedgerReport | None = None
    sent_by_source: dict[int, int] = field(default_factory=dict)
    receivers: list[int] = field(default_factory=list)
    mismatches: int = 0
    unanswered: int = 0
    server_errors: Counter[str] = field(default_factory=Counter)


def _payload_template(size: int) -> bytes:
    # Pre-formatted: only src/seq/ts change per message, so %-formatting bytes
    # is several times cheaper than serialising a dict.
    return b'{"src":%d,"seq":%d,"ts":%d,"pad":"' + b"x" * size + b'"}'


class Driver:
    """Base: holds the meter and the clients; subclasses implement the traffic."""

    def __init__(self, plan: RunPlan, clients: dict[int, Client], meter: Meter) -> None:
        self.plan = plan
        self.clients = clients
        self.meter = meter
        self.sending = False
        self.result = DriverReport()

    def start(self) -> None:
        """Begin sending (called at the common start time)."""
        self.sending = True

    def stop(self) -> None:
        """Stop originating new messages; replies keep being accounted."""
        self.sending = False

    def sent_by_source(self) -> dict[int, int]:
        """How many stream messages each local sender sent (whole run)."""
        return {}

    async def drain(self, sent_totals: dict[int, int], deadline: float) -> None:
        """Wait until everything owed to local receivers arrived, or ``deadline``."""
        while time.monotonic() < deadline:
            if self._complete(sent_totals):
                return
            await asyncio.sleep(_DRAIN_POLL_S)

    def report(self) -> DriverReport:
        """Final totals; call after ``drain``."""
        self.result.meter = self.meter.report()
        return self.result

    def on_message(self, client: Client, payload: bytes) -> None:
        """Handle one message received by ``client``."""
        raise NotImplementedError

    def _complete(self, sent_totals: dict[int, int]) -> bool:
        raise NotImplementedError

    def _server_error(self, message: dict[str, Any]) -> None:
        self.result.server_errors[str(message.get("message", "error"))] += 1

    def _decode(self, payload: bytes) -> dict[str, Any] | None:
        """The JSON object in ``payload``; anything else counts as a mismatch (None)."""
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            self.result.mismatches += 1
            return None
        return message


class EchoDriver(Driver):
    """Each connection keeps ``pipeline`` messages in flight; replies must match."""

    def __init__(self, plan: RunPlan, clients: dict[int, Client], meter: Meter) -> None:
        super().__init__(plan, clients, meter)
        body = _payload_template(plan.size)
        # Raw echo servers return the frame verbatim; protocol servers wrap any
        # unknown type as {"type":"echo","data":...}.
        self._template = body if plan.raw else b'{"type":"bench",' + body[1:]
        self._next = dict.fromkeys(clients, 0)
        self._inflight: dict[int, dict[int, int]] = {i: {} for i in clients}

    def start(self) -> None:
        super().start()
        for client in self.clients.values():
            for _ in range(self.plan.pipeline):
                self._send(client)

    def _send(self, client: Client) -> None:
        index = client.index
        seq = self._next[index]
        self._next[index] = seq + 1
        now = time.monotonic_ns()
        self._inflight[index][seq] = now
        client.send(self._template % (index, seq, now))
        self.meter.on_send(now)

    def on_message(self, client: Client, payload: bytes) -> None:
        now = time.monotonic_ns()
        message = self._decode(payload)
        if message is None:
            return
        if not self.plan.raw:
            if message.get("type") == "error":
                self._server_error(message)
                return
            message = message.get("data")
            if not isinstance(message, dict):
                self.result.mismatches += 1
                return
        sent_at = self._inflight[client.index].pop(message.get("seq", -1), None)
        if (
            sent_at is None
            or message.get("ts") != sent_at
            or message.get("src") != client.index
            or len(message.get("pad", "")) != self.plan.size
        ):
            self.result.mismatches += 1
            return
        self.meter.on_receive(now, sent_at)
        if self.sending:
            self._send(client)

    def _complete(self, sent_totals: dict[int, int]) -> bool:
        return not any(self._inflight.values())

    def report(self) -> DriverReport:
        self.result.unanswered = sum(len(v) for v in self._inflight.values())
        return super().report()


class StreamDriver(Driver):
    """fanout / broadcast / private: numbered streams checked for gaps and duplicates.

    Each sender bounds its un-acknowledged messages by ``max_inflight`` so a
    saturated server is never flooded without bound. The acknowledgement is
    the sender's own room echo (fanout), ``message_sent`` (private), or the
    arrival at another connection of this process (broadcast, which has no
    echo to the sender).
    """

    _DELIVERY_TYPES = frozenset({"room_message", "broadcast", "private_message"})

    def __init__(self, plan: RunPlan, clients: dict[int, Client], meter: Meter) -> None:
        super().__init__(plan, clients, meter)
        self.ledger = SequenceLedger()
        body = _payload_template(plan.size)
        self._senders = [clients[i] for i in sorted(clients) if plan.is_sender(i)]
        self._seq = {c.index: 0 for c in self._senders}
        self._acked = {c.index: 0 for c in self._senders}
        self._witness: dict[int, int | None] = {}
        self._frames: dict[int, bytes] = {}
        room = orjson.dumps(plan.room)
        for c in self._senders:
            if plan.scenario == "fanout":
                head = b'{"type":"room_message","room":' + room + b',"message":'
            elif plan.scenario == "broadcast":
                head = b'{"type":"broadcast","message":'
            else:
                partner = orjson.dumps(plan.user_id(c.index ^ 1))
                head = b'{"type":"private","to":' + partner + b',"message":'
            self._frames[c.index] = head + body + b"}"
            others = [i for i in clients if i != c.index]
            broadcast = plan.scenario == "broadcast"
            self._witness[c.index] = others[0] if broadcast and others else None
        self._ticker: asyncio.Task[None] | None = None
        self._owed_fresh = 0
        self._owed = 0

    def start(self) -> None:
        super().start()
        if self.plan.rate > 0:
            self._ticker = asyncio.get_running_loop().create_task(self._pace())
        else:
            for c in self._senders:
                for _ in range(self.plan.max_inflight):
                    self._send(c)

    def stop(self) -> None:
        super().stop()
        if self._ticker is not None:
            self._ticker.cancel()

    def sent_by_source(self) -> dict[int, int]:
        return dict(self._seq)

    def _window_open(self, index: int) -> bool:
        if self.plan.scenario == "broadcast" and self._witness[index] is None:
            return True  # nothing local can observe delivery; pacing alone bounds it
        return self._seq[index] - self._acked[index] < self.plan.max_inflight

    def _send(self, client: Client) -> None:
        index = client.index
        seq = self._seq[index]
        self._seq[index] = seq + 1
        now = time.monotonic_ns()
        client.send(self._frames[index] % (index, seq, now))
        self.meter.on_send(now)

    async def _pace(self) -> None:
        per_sender = self.plan.rate / max(1, len(self.plan.senders()))
        t0 = self.meter.t0
        while self.sending:
            due = int((time.monotonic_ns() - t0) / 1e9 * per_sender) + 1
            for c in self._senders:
                while self._seq[c.index] < due and self._window_open(c.index):
                    self._send(c)
            await asyncio.sleep(_TICK_S)

    def on_message(self, client: Client, payload: bytes) -> None:
        now = time.monotonic_ns()
        message = self._decode(payload)
        if message is None:
            return
        kind = message.get("type")
        if kind in self._DELIVERY_TYPES:
            body = message.get("message")
            if not isinstance(body, dict):
                self.result.mismatches += 1
                return
            source = body.get("src")
            seq = body.get("seq")
            if not isinstance(source, int) or not isinstance(seq, int):
                self.result.mismatches += 1
                return
            receiver = client.index
            if source in self._acked and (
                source == receiver or self._witness.get(source) == receiver
            ):
                self._acked[source] += 1
                self._refill(source)
            if self.plan.is_receiver(receiver) and self.ledger.record(receiver, source, seq):
                if self.plan.expects(receiver, source):
                    self._owed_fresh += 1
                self.meter.on_receive(now, body.get("ts", now))
        elif kind == "message_sent":
            self._acked[client.index] += 1
            self._refill(client.index)
        elif kind == "error":
            self._server_error(message)

    def _refill(self, index: int) -> None:
        # Only the unpaced mode sends from acknowledgements; paced mode's ticker
        # picks up the reopened window on its next tick.
        if self.sending and self.plan.rate <= 0 and self._window_open(index):
            self._send(self.clients[index])

    async def drain(self, sent_totals: dict[int, int], deadline: float) -> None:
        self._owed = sum(
            sent_totals.get(source, 0)
            for receiver in self.clients
            for source in self.plan.sources_of(receiver)
        )
        await super().drain(sent_totals, deadline)

    def _complete(self, sent_totals: dict[int, int]) -> bool:
        return self._owed_fresh >= self._owed

    def report(self) -> DriverReport:
        self.result.ledger = self.ledger.report()
        self.result.receivers = [i for i in self.clients if self.plan.is_receiver(i)]
        self.result.sent_by_source = self.sent_by_source()
        return super().report()


DRIVERS: dict[str, type[Driver]] = {
    "echo": EchoDriver,
    "fanout": StreamDriver,
    "broadcast": StreamDriver,
    "private": StreamDriver,
}
