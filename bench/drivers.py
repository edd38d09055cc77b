"""Traffic drivers: what each scenario sends, and how replies are checked.

A driver runs inside one load process over that process's connections. The
worker calls ``start`` at the common start time, ``stop`` at the end of the
measured window, ``drain`` with the run-wide sent counts, then ``report``.
New scenarios register a driver class in :data:`DRIVERS`, per protocol.

Every frame is pre-built once per sender as a %-template, so sending costs one
%-format and no encoding. Stream messages are built from the message types of
``shoal.core.schema`` (mypy checks their shape, :func:`check_templates` the bytes),
or with ``--protocol pusher`` from Pusher's client event (checked with the server's own
parser, ``shoal.core.pusher``); the echo probe has a type of the bench's own, which the
chat app echoes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from shoal.bench import pusherwire
from shoal.bench.client import Client, server_type
from shoal.bench.ledger import LedgerReport, SequenceLedger
from shoal.bench.meter import Meter, MeterReport
from shoal.bench.plan import RunPlan
from shoal.core import schema

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


PROBE_TYPE = "bench"
"""The ``type`` of echo probes: one the chat app does not handle, so it answers each probe
with an ``echo`` holding it (docs/protocol.md, "Any other type")."""

StreamMessage = (
    schema.ClientRoomMessage
    | schema.ClientBroadcast
    | schema.ClientPrivate
    | pusherwire.ClientEvent
)
"""What a sender of the fanout, broadcast and private scenarios sends."""

# Stands for the payload while a message is encoded once; the payload template replaces it.
_SLOT = "<payload>"
_SLOT_JSON = orjson.dumps(_SLOT)


@functools.cache  # every sender of a process shares one
def _payload_template(size: int) -> bytes:
    # Pre-formatted: only src/seq/ts change per message, so %-formatting bytes
    # is several times cheaper than serialising a dict.
    return b'{"src":%d,"seq":%d,"ts":%d,"pad":"' + b"x" * size + b'"}'


def _payload(plan: RunPlan, src: int, seq: int, ts: int) -> dict[str, Any]:
    """The payload ``_payload_template`` formats for these numbers, decoded."""
    return {"src": src, "seq": seq, "ts": ts, "pad": "x" * plan.size}


def echo_template(plan: RunPlan) -> bytes:
    """The %-template (src, seq, ts) of every echo probe of ``plan``."""
    body = _payload_template(plan.size)
    if plan.raw:
        return body  # raw echo servers return the frame verbatim: no envelope
    # The probe is the payload with its type first: {"type":"bench","src":...}.
    return b'{"type":' + orjson.dumps(PROBE_TYPE) + b"," + body[1:]


def task_template(plan: RunPlan) -> bytes:
    """Every job of the task scenario: a `task` message whose data is the probe payload,
    a %-template (src, seq, ts) that noop returns whole; or, for process_data, the same
    `size` numbers in every job (no template)."""
    if plan.task == "noop":
        data = _payload_template(plan.size)
    else:
        data = b'{"numbers":[' + b",".join(b"%d" % n for n in range(plan.size)) + b"]}"
    return b'{"type":"task","task":' + orjson.dumps(plan.task) + b',"data":' + data + b"}"


def stream_message(plan: RunPlan, index: int) -> StreamMessage:
    """What sender ``index`` of ``plan``'s stream scenario sends, with a stand-in payload."""
    if plan.protocol == "pusher":
        return pusherwire.client_event(plan.channel, _SLOT)
    if plan.scenario == "fanout":
        return {"type": "room_message", "room": plan.room, "message": _SLOT}
    if plan.scenario == "broadcast":
        return {"type": "broadcast", "message": _SLOT}
    return {"type": "private", "to": plan.user_id(index ^ 1), "message": _SLOT}


def stream_template(plan: RunPlan, index: int) -> bytes:
    """The %-template (src, seq, ts) of every message sender ``index`` sends.

    Built once per sender from :func:`stream_message`, so the schema's type checks its
    shape; sending then costs one %-format, no encoding.
    """
    # rpartition: the payload is the last field, even if a name happened to equal _SLOT.
    head, slot, tail = orjson.dumps(stream_message(plan, index)).rpartition(_SLOT_JSON)
    if not slot:
        raise ValueError("the stream message holds no payload slot")
    # Only the payload's numbers are formatted in: a % in a room or user name stays one.
    head, tail = head.replace(b"%", b"%%"), tail.replace(b"%", b"%%")
    return head + _payload_template(plan.size) + tail


def check_templates(plan: RunPlan) -> None:
    """Check that the frames ``plan``'s drivers pre-build are the schema's messages.

    Call it once per run, before the load processes start: the schema's validator is
    built on first use, which is too slow for the moment a driver starts sending.

    Raises:
        ValueError: a template does not decode to the message it stands for.
    """
    src, seq, ts = 1, 2, 3
    sample: dict[str, Any]
    if plan.scenario == "echo":
        sample = orjson.loads(echo_template(plan) % (src, seq, ts))
        expected = _payload(plan, src, seq, ts)
        if not plan.raw:
            if PROBE_TYPE in schema.CLIENT_TYPES:
                raise ValueError(f"the chat app handles {PROBE_TYPE!r}: it would not echo probes")
            expected = {"type": PROBE_TYPE, **expected}
        if sample != expected:
            raise ValueError(f"echo probe template decodes to {sample!r}")
    elif plan.scenario == "task":
        template = task_template(plan)
        sample = orjson.loads(template % (src, seq, ts) if plan.task == "noop" else template)
        schema.check_client_message(sample)
        if plan.task == "noop" and sample["data"] != _payload(plan, src, seq, ts):
            raise ValueError(f"task template decodes to {sample!r}")
    elif plan.scenario in ("fanout", "broadcast", "private"):
        src = plan.senders()[0]
        frame = stream_template(plan, src) % (src, seq, ts)
        sample = orjson.loads(frame)
        expected = dict(stream_message(plan, src))
        if plan.protocol == "pusher":
            pusherwire.check_client_event(frame)
            expected["data"] = _payload(plan, src, seq, ts)
        else:
            schema.check_client_message(sample)
            expected["message"] = _payload(plan, src, seq, ts)
        if sample != expected:
            raise ValueError(f"stream template decodes to {sample!r}")


class Driver:
    """Base: holds the meter and the clients; subclasses implement the traffic."""

    def __init__(self, plan: RunPlan, clients: dict[int, Client], meter: Meter) -> None:
        self.plan = plan
        self.clients = clients
        self.meter = meter
        self.sending = False
        self.result = DriverReport()
        self.positions: dict[int, schema.RoomPosition] = {}
        """With ``--resume``: the last offset and epoch of the room each connection saw
        (the worker seeds it with each join's position)."""

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

    def away(self, index: int) -> None:
        """Connection ``index`` broke and is reconnecting (``--resume``): send nothing on it."""
        raise NotImplementedError

    def rejoined(self, client: Client, recovered: bool) -> int:
        """``client`` took the place of its index's broken connection, and rejoined the
        room; ``recovered``: its join said every message after its position was replayed.
        Go on with it.

        Returns:
            How many of its own messages the sender goes back over and sends again.
        """
        raise NotImplementedError

    def _complete(self, sent_totals: dict[int, int]) -> bool:
        raise NotImplementedError

    def _server_error(self, message: schema.ServerMessage) -> None:
        self.result.server_errors[str(message.get("message", "error"))] += 1

    def _decode(self, payload: bytes | str) -> Any:
        """The JSON object (a dict) in ``payload``; anything else counts as a mismatch (None).

        Untyped, as JSON is: the caller annotates what it expects, which costs nothing at
        run time (unlike ``cast``). Replies annotated as ``schema.ServerMessage`` are not
        validated, the server under test is not trusted: read their fields with ``get``.
        """
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            self.result.mismatches += 1
            return None
        return message


class _Pipelined(Driver):
    """Base of the closed-loop drivers: each connection keeps ``pipeline`` requests in
    flight, and sends the next one when a reply came back."""

    def __init__(self, plan: RunPlan, clients: dict[int, Client], meter: Meter) -> None:
        super().__init__(plan, clients, meter)
        self._next = dict.fromkeys(clients, 0)

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
        client.send(self._request(index, seq, now))
        self.meter.on_send(now)

    def _request(self, index: int, seq: int, now: int) -> bytes:
        """Note request ``seq`` of connection ``index`` as sent; return its frame."""
        raise NotImplementedError


class EchoDriver(_Pipelined):
    """Each connection keeps ``pipeline`` messages in flight; replies must match."""

    def __init__(self, plan: RunPlan, clients: dict[int, Client], meter: Meter) -> None:
        super().__init__(plan, clients, meter)
        self._template = echo_template(plan)
        self._inflight: dict[int, dict[int, int]] = {i: {} for i in clients}

    def _request(self, index: int, seq: int, now: int) -> bytes:
        self._inflight[index][seq] = now
        return self._template % (index, seq, now)

    def on_message(self, client: Client, payload: bytes) -> None:
        now = time.monotonic_ns()
        message = self._decode(payload)
        if message is None:
            return
        if not self.plan.raw:
            reply: schema.ServerMessage = message
            if reply.get("type") == "error":
                self._server_error(reply)
                return
            # Protocol servers answer a probe with {"type":"echo","data":probe}.
            message = reply.get("data")
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


class TaskDriver(_Pipelined):
    """Each connection keeps ``pipeline`` jobs in flight; each job's result must come
    back once, to the connection that dispatched it, and be right.

    Latency is from the `task` message to its `task_result`: the whole path, through the
    WebSocket worker, Redis, a task process, Redis again and the worker.
    """

    def __init__(self, plan: RunPlan, clients: dict[int, Client], meter: Meter) -> None:
        super().__init__(plan, clients, meter)
        self._template = task_template(plan)
        self._formatted = plan.task == "noop"
        # Sent, not yet dispatched (the server answers a connection's jobs in order).
        self._sent: dict[int, collections.deque[tuple[int, int]]] = {
            i: collections.deque() for i in clients
        }
        self._dispatched: dict[str, tuple[int, int]] = {}

    def _request(self, index: int, seq: int, now: int) -> bytes:
        self._sent[index].append((seq, now))
        return self._template % (index, seq, now) if self._formatted else self._template

    def on_message(self, client: Client, payload: bytes) -> None:
        now = time.monotonic_ns()
        message: schema.ServerMessage | None = self._decode(payload)
        if message is None:
            return
        kind = message.get("type")
        if kind == "task_dispatched":
            sent = self._sent[client.index]
            if not sent:
                self.result.mismatches += 1
                return
            self._dispatched[str(message.get("task_id"))] = sent.popleft()
        elif kind == "task_result":
            sent_seq = self._dispatched.pop(str(message.get("task_id")), None)
            if sent_seq is None or not self._right(client, sent_seq, message.get("result")):
                self.result.mismatches += 1
                return
            self.meter.on_receive(now, sent_seq[1])
            if self.sending:
                self._send(client)
        elif kind in ("task_failed", "error"):
            error = message.get("error") if kind == "task_failed" else message
            self.result.server_errors[str(error)] += 1

    def _right(self, client: Client, sent: tuple[int, int], result: Any) -> bool:
        if not isinstance(result, dict):
            return False
        if self.plan.task == "noop":
            return bool(result == _payload(self.plan, client.index, sent[0], sent[1]))
        return bool(result.get("count") == self.plan.size)

    def _complete(self, sent_totals: dict[int, int]) -> bool:
        return not self._dispatched and not any(self._sent.values())

    def report(self) -> DriverReport:
        self.result.unanswered = len(self._dispatched) + sum(len(s) for s in self._sent.values())
        return super().report()


class StreamDriver(Driver):
    """fanout / broadcast / private: numbered streams checked for gaps and duplicates.

    Each sender bounds its un-acknowledged messages by ``max_inflight`` so a
    saturated server is never flooded without bound. The acknowledgement is
    the sender's own room echo (fanout), ``message_sent`` (private), or the
    arrival at another connection of this process (broadcast, and Pusher's client
    events: neither comes back to its sender).

    With ``--resume`` (fanout), a publisher whose connection broke has its echoes
    replayed by its resumed join, each once and in order: once the join says
    ``recovered``, the room holds exactly its first ``acked`` messages, so those after
    them never reached it, and the publisher sends them again under the same numbers.
    """

    _DELIVERY_TYPES = frozenset(
        server_type(kind) for kind in (schema.RoomMessage, schema.Broadcast, schema.PrivateMessage)
    )

    def __init__(self, plan: RunPlan, clients: dict[int, Client], meter: Meter) -> None:
        super().__init__(plan, clients, meter)
        self.ledger = SequenceLedger()
        self._senders = [i for i in sorted(clients) if plan.is_sender(i)]
        self._seq = dict.fromkeys(self._senders, 0)
        self._acked = dict.fromkeys(self._senders, 0)
        self._witness: dict[int, int | None] = {}
        self._frames: dict[int, bytes] = {}
        self._echoless = plan.scenario == "broadcast" or plan.protocol == "pusher"
        self._away: set[int] = set()
        for sender in self._senders:
            self._frames[sender] = stream_template(plan, sender)
            # Every other connection receives what it sends: the first one is the witness.
            others = (i for i in clients if i != sender)
            self._witness[sender] = next(others, None) if self._echoless else None
        self._ticker: asyncio.Task[None] | None = None
        self._owed_fresh = 0
        self._owed = 0

    def start(self) -> None:
        super().start()
        if self.plan.rate > 0:
            self._ticker = asyncio.get_running_loop().create_task(self._pace())
        else:
            for sender in self._senders:
                for _ in range(self.plan.max_inflight):
                    self._send(sender)

    def stop(self) -> None:
        super().stop()
        if self._ticker is not None:
            self._ticker.cancel()

    def sent_by_source(self) -> dict[int, int]:
        return dict(self._seq)

    def _window_open(self, index: int) -> bool:
        if index in self._away:
            return False
        if self._echoless and self._witness[index] is None:
            return True  # nothing local can observe delivery; pacing alone bounds it
        return self._seq[index] - self._acked[index] < self.plan.max_inflight

    def _send(self, index: int) -> None:
        seq = self._seq[index]
        self._seq[index] = seq + 1
        now = time.monotonic_ns()
        self.clients[index].send(self._frames[index] % (index, seq, now))
        self.meter.on_send(now)

    async def _pace(self) -> None:
        per_sender = self.plan.rate / max(1, len(self.plan.senders()))
        t0 = self.meter.t0
        while self.sending:
            due = int((time.monotonic_ns() - t0) / 1e9 * per_sender) + 1
            for sender in self._senders:
                while self._seq[sender] < due and self._window_open(sender):
                    self._send(sender)
            await asyncio.sleep(_TICK_S)

    def on_message(self, client: Client, payload: bytes) -> None:
        now = time.monotonic_ns()
        # Annotated with the schema so that mypy checks each type compared below.
        message: schema.ServerMessage | None = self._decode(payload)
        if message is None:
            return
        kind = message.get("type")
        if kind in self._DELIVERY_TYPES:
            if self.plan.resume:
                offset, epoch = message.get("offset"), message.get("epoch")
                if isinstance(offset, str) and isinstance(epoch, str):
                    self.positions[client.index] = {"offset": offset, "epoch": epoch}
            self._delivered(client, message.get("message"), now)
        elif kind == "message_sent":
            self._acked[client.index] += 1
            self._refill(client.index)
        elif kind == "error":
            self._server_error(message)

    def _delivered(self, client: Client, body: Any, now: int) -> None:
        """Account the payload ``body`` of a stream message ``client`` received at ``now``."""
        if not isinstance(body, dict):
            self.result.mismatches += 1
            return
        source = body.get("src")
        seq = body.get("seq")
        if not isinstance(source, int) or not isinstance(seq, int):
            self.result.mismatches += 1
            return
        receiver = client.index
        if source in self._acked:  # sent from this process: an acknowledgement?
            if source == receiver:
                if self._echoless:
                    # Never sent back to its sender: the ledger makes it "unexpected".
                    self.ledger.record(receiver, source, seq)
                    return
                self._acked[source] += 1
                self._refill(source)
            elif self._witness.get(source) == receiver:
                self._acked[source] += 1
                self._refill(source)
        if self.plan.is_receiver(receiver) and self.ledger.record(receiver, source, seq):
            if self.plan.expects(receiver, source):
                self._owed_fresh += 1
            self.meter.on_receive(now, body.get("ts", now))

    def _refill(self, index: int) -> None:
        # Only the unpaced mode sends from acknowledgements; paced mode's ticker
        # picks up the reopened window on its next tick.
        if self.sending and self.plan.rate <= 0 and self._window_open(index):
            self._send(index)

    def away(self, index: int) -> None:
        self._away.add(index)

    def rejoined(self, client: Client, recovered: bool) -> int:
        index = client.index
        self.clients[index] = client
        self._away.discard(index)
        if index not in self._seq or not recovered:
            return 0  # not recovered: its echoes prove nothing, and the run says so
        resent = self._seq[index] - self._acked[index]
        self._seq[index] = self._acked[index]
        if not self.sending:
            # The window closed with these counted as sent: they are owed, send them now.
            for _ in range(resent):
                self._send(index)
        elif self.plan.rate <= 0:
            while self._window_open(index):
                self._send(index)
        return resent

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


class PusherStreamDriver(StreamDriver):
    """fanout on a Pusher channel: publishers send client events, every other subscriber
    receives them as ``{"event":"client-bench","channel":..,"data":payload}``.

    ``data`` is the object the publisher sent (shoal and Pusher forward client events as
    they came); a JSON string is decoded too, as servers send their own events' data.
    """

    def on_message(self, client: Client, payload: bytes) -> None:
        now = time.monotonic_ns()
        message = self._decode(payload)
        if message is None:
            return
        event = message.get("event")
        if event == pusherwire.EVENT:
            body = message.get("data")
            if type(body) is str:
                body = self._decode(body)
                if body is None:
                    return
            self._delivered(client, body, now)
        elif event == pusherwire.PING:
            client.send(pusherwire.PONG)  # or the server closes the connection as idle
        elif event == pusherwire.ERROR:
            code, text = pusherwire.error(message)
            self.result.server_errors[text if code is None else f"{code}: {text}"] += 1


DRIVERS: dict[tuple[str, str], type[Driver]] = {
    ("shoal", "echo"): EchoDriver,
    ("shoal", "fanout"): StreamDriver,
    ("shoal", "broadcast"): StreamDriver,
    ("shoal", "private"): StreamDriver,
    ("shoal", "task"): TaskDriver,
    ("pusher", "fanout"): PusherStreamDriver,
}
"""The driver of each (protocol, scenario); connect has none (no traffic)."""
