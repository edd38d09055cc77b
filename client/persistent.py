"""`PersistentClient`: an asyncio client that stays connected to shoal.

On a drop it reconnects as shoal's close-code table (`shoal.core.schema.advice`) says:
promptly with jitter after a restart, with exponential backoff after a failure, never
after a kick, a ban or an expired token. While disconnected, `send()` queues; after
reconnecting it joins the rooms and channels it was in and sets its metadata again, then
sends the queue in order, then tells the application how long it was away. A room that
keeps a history is rejoined from the last offset the client saw in it (`since`): the
server sends what the room said meanwhile first, through the same callbacks as live
messages, or says why it cannot (the `recovery_failed` event).

One task runs the connection (connect, resync, flush, read); another runs the
application's callbacks, one at a time and in order, so a slow callback never stops the
reading, and a callback may itself `await client.request(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed as WebSocketClosed
from websockets.typing import Subprotocol

from shoal.client import wire
from shoal.client.backoff import Backoff
from shoal.client.errors import (
    AuthenticationFailed,
    ClientError,
    ConnectFailed,
    ConnectionClosed,
    ErrorReply,
    GaveUp,
    HandshakeRefused,
    QueueFull,
    TaskFailed,
    TimedOut,
)
from shoal.client.positions import Position, Positions
from shoal.core import schema

logger = logging.getLogger(__name__)

QueuePolicy = Literal["raise", "drop_oldest"]
Callback = Callable[[Any], Any]
"""A sync function or a coroutine function of one argument (the event's payload)."""
_C = TypeVar("_C", bound=Callback)

EVENTS = frozenset(
    {
        "connected",
        "disconnected",
        "reconnecting",
        "reconnected",
        "recovery_failed",
        "message",
        "binary",
        "error",
    }
)
"""The client's own events. Any other name passed to `on()` is a JSON message type."""

# Handshake refusals that are worth retrying: the server is full, busy, or rate limiting.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class State(Enum):
    """Where the client stands."""

    IDLE = "idle"
    """Not started."""
    CONNECTING = "connecting"
    """Opening a connection, or waiting before the next attempt."""
    RESYNCING = "resyncing"
    """Connected; joining rooms again and sending the queue. `send()` still queues."""
    OPEN = "open"
    """Connected; `send()` goes straight out."""
    CLOSED = "closed"
    """Stopped for good: `close()`, or it gave up (`wait_closed()` raises why)."""


@dataclass(frozen=True, slots=True)
class Connected:
    """The `connected` event: a connection opened (the first, or a reconnection)."""

    url: str
    subprotocol: str | None
    reconnection: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The `disconnected` event: the connection ended.

    `reconnect` says whether the client will try again (from `advice`, shoal's table).
    """

    code: int
    reason: str
    advice: schema.Advice
    reconnect: bool


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The `reconnecting` event: attempt number `attempt` (1 for the first after a drop)
    starts in `delay` seconds; `cause` is what ended the last connection or attempt."""

    attempt: int
    delay: float
    cause: ClientError


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The `reconnected` event: connected again, rooms and channels joined again, the queue
    sent. `downtime` is the time since the drop, in seconds: what a room with a history
    said meanwhile came before this event (unless `recovery_failed` said otherwise);
    anything else sent to this user meanwhile is lost, so refetch what matters.
    `attempts`: the connection attempts it took.

    `rejoined` and `resubscribed` are the rooms and channels joined again; `sent` the
    queued messages sent; `dropped` those lost to `max_queue` (`drop_oldest`) while away.
    """

    downtime: float
    attempts: int
    rejoined: tuple[str, ...]
    resubscribed: tuple[str, ...]
    sent: int
    dropped: int


@dataclass(frozen=True, slots=True)
class RecoveryFailed:
    """The `recovery_failed` event: `room` keeps a history, but rejoining it from where the
    client left it could not catch the client up, and nothing was replayed. `reason` is the
    server's: `epoch changed: ...` (the history was lost, e.g. Redis restarted empty),
    `offset too old: ...` (the history kept starts after it: the client was away longer
    than it lasts) or `offset unknown: ...`. Refetch the room's messages from the
    application's own records; live messages follow as usual.
    """

    room: str
    reason: str


@dataclass(eq=False, slots=True)
class _Request:
    """A request in flight: its message, the reply type it waits for, its outcome."""

    message: dict[str, Any]
    expected: str
    future: asyncio.Future[dict[str, Any]]
    task: bool = False
    """A task request: `task_dispatched` first, then the outcome with its id."""
    task_id: str | None = None
    placeholder: bool = False
    """A task sent with `send()`: nobody waits, but its `task_dispatched` (or error) must
    not be taken for the reply of a request sent after it."""


@dataclass(eq=False, slots=True)
class _Queued:
    frame: wire.Data
    request: _Request | None = None


@dataclass(slots=True)
class _Away:
    """What happened while disconnected, for the `reconnected` event."""

    since: float
    dropped: int = 0


@dataclass(slots=True)
class _Stop:
    """Why the run loop ended: None for `close()`."""

    error: ClientError | None = None


class PersistentClient:
    """An asyncio connection to a shoal server that reconnects by itself.

    Args:
        url: `ws://` or `wss://` URL.
        token: a JWT, sent as `Authorization: Bearer <token>` on every connection.
        headers: extra handshake headers.
        ssl: the TLS context for `wss://`.
        subprotocols: offered in `Sec-WebSocket-Protocol`.
        reconnect_delay: the ceiling of the first reconnect delay, in seconds.
        max_delay: the longest delay between attempts.
        max_reconnect_attempts: attempts after a drop (or after a failed first attempt)
            before giving up (`GaveUp`); None: forever.
        max_queue: messages kept while disconnected.
        queue_policy: when `max_queue` messages are queued, `"raise"` refuses the new one
            (`QueueFull`); `"drop_oldest"` drops the oldest to make room (counted in
            `dropped` and the `reconnected` event).
        open_timeout: seconds one connection attempt may take (TCP, TLS, handshake).
        ping_interval: seconds between the client's pings; None: no ping.
        ping_timeout: seconds a ping's pong may take before the connection is taken for
            dead, closed and reconnected; None: no limit. A network that drops the
            connection without a word (no FIN, no RST) is noticed this way only, within
            `ping_interval + ping_timeout + close_timeout`.
        close_timeout: seconds a closing handshake may take (the server's close frame,
            then the end of the TCP connection) before the connection is dropped.
        request_timeout: the default timeout of `request()`.
        rng, clock, sleep: the random source of the jitter, the monotonic clock of the
            downtime and the sleep between attempts; tests replace them.

    Raises:
        ValueError: a URL that is not `ws://`/`wss://`, `ssl` with `ws://`, or a bad
            setting.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        ssl: ssl.SSLContext | None = None,
        subprotocols: Sequence[str] | None = None,
        reconnect_delay: float = 1.0,
        max_delay: float = 30.0,
        max_reconnect_attempts: int | None = None,
        max_queue: int = 1000,
        queue_policy: QueuePolicy = "raise",
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float | None = 10.0,
        request_timeout: float = 30.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        wire.check_url(url, ssl)
        if max_queue < 0:
            raise ValueError("max_queue must not be negative")
        if queue_policy not in ("raise", "drop_oldest"):
            raise ValueError(f"queue_policy must be 'raise' or 'drop_oldest': {queue_policy!r}")
        if max_reconnect_attempts is not None and max_reconnect_attempts < 0:
            raise ValueError("max_reconnect_attempts must not be negative")
        timeouts = {
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "close_timeout": close_timeout,
        }
        for name, seconds in timeouts.items():
            if seconds is not None and not seconds > 0:
                raise ValueError(f"{name} must be positive seconds, or None: {seconds!r}")
        self.url = url
        self.backoff = Backoff(reconnect_delay, max_delay, rng or random.Random())
        self.max_reconnect_attempts = max_reconnect_attempts
        self.max_queue = max_queue
        self.queue_policy: QueuePolicy = queue_policy
        self.request_timeout = request_timeout
        self._connect_options: dict[str, Any] = {
            "additional_headers": wire.handshake_headers(headers, token),
            "subprotocols": [Subprotocol(p) for p in subprotocols or ()] or None,
            "open_timeout": open_timeout,
            **timeouts,
        }
        if ssl is not None:  # websockets' asyncio client takes ssl=None as "no TLS"
            self._connect_options["ssl"] = ssl
        self._clock = clock
        self._sleep = sleep
        self._state = State.IDLE
        self._ws: ClientConnection | None = None
        self._queue: deque[_Queued] = deque()
        self._awaiting: deque[_Request] = deque()  # sent, first reply not yet in
        self._tasks: dict[str, _Request] = {}  # dispatched, outcome not yet in
        self._handlers: dict[str, list[Callback]] = {}
        self._events: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()
        self._rooms: dict[str, None] = {}  # insertion-ordered sets
        self._channels: dict[str, None] = {}
        self._metadata: dict[str, Any] | None = None
        self._positions = Positions()
        self._dropped = 0
        self._closing = False
        self._close_frame: tuple[int, str] = (1000, "")
        self._opened = asyncio.Event()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[_Stop] | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    # The application's side

    @overload
    def on(self, event: str) -> Callable[[_C], _C]: ...

    @overload
    def on(self, event: str, callback: _C) -> _C: ...

    def on(self, event: str, callback: _C | None = None) -> _C | Callable[[_C], _C]:
        """Call `callback` on `event`; usable as a decorator (`@client.on("joined_room")`).

        Events: `connected` (`Connected`), `disconnected` (`Disconnected`), `reconnecting`
        (`Reconnecting`), `reconnected` (`Reconnected`), `recovery_failed`
        (`RecoveryFailed`, after that `joined_room`), `message` (every text message: its
        JSON value, or the str when it is not JSON), `binary` (bytes), `error` (a
        `ClientError`: an `ErrorReply` for an error frame no request claimed, a
        `ConnectFailed` for a failed attempt, or what a callback raised). Any other name
        is a message type: the callback gets each JSON object of that `type`.

        Callbacks run one at a time, in the order the events happened; a coroutine
        function is awaited. One that raises is reported to the `error` callbacks.
        """
        if callback is None:

            def register(function: _C) -> _C:
                return self.on(event, function)

            return register
        self._handlers.setdefault(event, []).append(callback)
        return callback

    @property
    def state(self) -> State:
        return self._state

    @property
    def connected(self) -> bool:
        """Whether a connection is open now (`RESYNCING` or `OPEN`)."""
        return self._state in (State.RESYNCING, State.OPEN)

    @property
    def rooms(self) -> tuple[str, ...]:
        """The rooms joined (as the server confirmed), to be joined again after a drop."""
        return tuple(self._rooms)

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self._channels)

    def position(self, room: str) -> Position | None:
        """Where the client stands in `room`, a room that keeps a history: the offset and
        epoch of the last message it saw, which the next rejoin resumes from. None: the
        client is not in the room, or the room keeps no history."""
        return self._positions.of(room)

    @property
    def queued(self) -> int:
        """Messages waiting for a connection."""
        return len(self._queue)

    @property
    def dropped(self) -> int:
        """Messages dropped by the `drop_oldest` policy since the client was created."""
        return self._dropped

    async def start(self, *, wait: bool = True) -> None:
        """Start connecting (and reconnecting until `close()`).

        Args:
            wait: return once the first connection is open; else at once.

        Raises:
            GaveUp: with `wait`, it stopped before a connection opened (the token was
                refused, the address banned, or `max_reconnect_attempts` failed).
            RuntimeError: started twice.
        """
        if self._runner is not None:
            raise RuntimeError("this PersistentClient was started already")
        self._dispatcher = asyncio.create_task(self._dispatch(), name="shoal-client-events")
        self._runner = asyncio.create_task(self._run(), name="shoal-client")
        if wait:
            opened = asyncio.create_task(self._opened.wait())
            await asyncio.wait({opened, self._runner}, return_when=asyncio.FIRST_COMPLETED)
            opened.cancel()
            if not self._opened.is_set():
                await self.wait_closed()

    async def send(self, data: Any) -> bool:
        """Send a message (str as text, bytes as binary, dict or list as JSON), or queue it
        while disconnected. Returns whether it went out now (False: queued).

        Queued messages go out in order after reconnecting, after the rooms are joined
        again. A message handed to a connection that breaks at that moment may be lost:
        shoal delivers at most once.

        Raises:
            TypeError: a type that cannot be sent.
            QueueFull: the queue holds `max_queue` messages (`raise` policy).
            ConnectionClosed: the client is closed.
        """
        frame = wire.encode(data)
        placeholder = None
        if isinstance(data, dict) and data.get("type") == "task":
            future = asyncio.get_running_loop().create_future()
            placeholder = _Request(dict(data), "task_dispatched", future, placeholder=True)
        return await self._submit(_Queued(frame, placeholder))

    async def request(
        self, message: Mapping[str, Any], reply_type: str, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send `message` (queued while disconnected) and return its reply, the first
        message of type `reply_type` that follows.

        shoal answers a connection's messages in order and error frames carry no request
        id, so an `error` frame answers the oldest request still waiting. A `task`
        message with `reply_type="task_result"` waits for its `task_dispatched`, then for
        the `task_result` with that `task_id`, across reconnections (shoal delivers a
        task's outcome to its user even on a new connection).

        Raises:
            ErrorReply: an error frame answered it.
            TaskFailed: the task ended with `task_failed`.
            TimedOut: no reply within `timeout` (`request_timeout` when None). A request
                still queued then is taken out of the queue: it is never sent.
            ConnectionClosed: the connection dropped after the message went out and
                before its first reply (the reply is lost; retry if it is safe), or the
                client is closed.
            QueueFull: as `send()`.
        """
        task = message.get("type") == "task" and reply_type == "task_result"
        frame = wire.encode(dict(message))
        loop = asyncio.get_running_loop()
        pending = _Request(
            dict(message), "task_dispatched" if task else reply_type, loop.create_future(), task
        )
        item = _Queued(frame, pending)
        limit = self.request_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                await self._submit(item)
                return await asyncio.shield(pending.future)
        except TimeoutError:
            raise TimedOut(f"no {reply_type} within {limit:g}s") from None
        finally:
            # A request abandoned after it went out stays first in line for its reply
            # (cancelled), so that a late reply is not taken for the next one's.
            if not pending.future.done():
                pending.future.cancel()
            self._forget(item)

    # The room and channel helpers: each is `request()` with the matching reply type.

    async def join_room(self, room: str, timeout: float | None = None) -> dict[str, Any]:
        """Join `room` (again after every reconnection); return `joined_room`."""
        return await self.request({"type": "join_room", "room": room}, "joined_room", timeout)

    async def leave_room(self, room: str, timeout: float | None = None) -> dict[str, Any]:
        return await self.request({"type": "leave_room", "room": room}, "left_room", timeout)

    async def subscribe(self, channel: str, timeout: float | None = None) -> dict[str, Any]:
        """Subscribe to `channel` (again after every reconnection); return `subscribed`."""
        message = {"type": "subscribe", "channel": channel}
        return await self.request(message, "subscribed", timeout)

    async def unsubscribe(self, channel: str, timeout: float | None = None) -> dict[str, Any]:
        message = {"type": "unsubscribe", "channel": channel}
        return await self.request(message, "unsubscribed", timeout)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection and stop reconnecting. Queued messages are dropped;
        requests waiting fail with `ConnectionClosed`. Callbacks of events that happened
        before run first (unless `close()` is called from a callback)."""
        self._closing = True
        self._close_frame = (code, reason)
        self._wake.set()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close(code, reason)
        if self._runner is not None:
            if self._state is State.CONNECTING and self._ws is None:
                self._runner.cancel()  # an attempt in progress may take open_timeout
            await asyncio.wait({self._runner})
        self._state = State.CLOSED
        self._fail_all(ConnectionClosed(code, reason))
        self._queue.clear()
        if self._dispatcher is not None and not self._dispatcher.done():
            self._events.put_nowait(None)
            if asyncio.current_task() is not self._dispatcher:
                await asyncio.wait({self._dispatcher})

    async def wait_closed(self) -> None:
        """Wait until the client stops for good.

        Raises:
            GaveUp: it stopped on its own (kicked, banned, token refused or expired,
                `max_reconnect_attempts`); `__cause__` says which.
        """
        if self._runner is None:
            raise RuntimeError("this PersistentClient was not started")
        stop = await asyncio.shield(self._runner)
        if stop.error is not None:
            raise GaveUp(str(stop.error)) from stop.error

    async def __aenter__(self) -> PersistentClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # The connection's side

    async def _run(self) -> _Stop:
        """Connect, resync, read; after a drop, wait as advised and do it again."""
        retries = 0  # retries since a connection last opened
        # After a failed first attempt, or a drop that is not a restart: BACKOFF. After a
        # restart (1001, 1012): PROMPTLY. The close code picks the sequence it starts.
        how = schema.Reconnect.BACKOFF
        cause: ClientError | None = None  # what ended the last connection or attempt
        retry_after: float | None = None
        away: _Away | None = None
        try:
            while not self._closing:
                self._state = State.CONNECTING
                if cause is not None:
                    limit = self.max_reconnect_attempts
                    if limit is not None and retries >= limit:
                        return _Stop(cause)
                    delay = max(self.backoff.delay(retries, how), retry_after or 0.0)
                    retries += 1
                    self._emit("reconnecting", Reconnecting(retries, delay, cause))
                    await self._pause(delay)
                    if self._closing:
                        break
                try:
                    ws = await connect(self.url, **self._connect_options)
                except Exception as exc:
                    error = wire.connect_failed(self.url, exc)
                    error.__cause__ = exc
                    self._emit("error", error)
                    if _hopeless(error, exc):
                        return _Stop(error)
                    cause = error
                    retry_after = getattr(error, "retry_after", None)
                    continue
                code, reason = await self._serve(ws, away, retries)
                retries, retry_after = 0, None
                away = _Away(self._clock(), dropped=self._dropped)
                advice = schema.advice(code)
                if self._closing:
                    self._emit("disconnected", Disconnected(code, reason, advice, False))
                    break
                again = advice.reconnect is not schema.Reconnect.NEVER
                self._emit("disconnected", Disconnected(code, reason, advice, again))
                cause = ConnectionClosed(code, reason)
                if not again:
                    return _Stop(cause)
                if not advice.resync:
                    self._rooms.clear()
                    self._channels.clear()
                    self._metadata = None
                    self._positions.clear()
                how = (
                    schema.Reconnect.PROMPTLY
                    if advice.reconnect is schema.Reconnect.PROMPTLY
                    else schema.Reconnect.BACKOFF
                )
            return _Stop()
        except asyncio.CancelledError:
            if self._closing:  # close() during a connection attempt
                return _Stop()
            raise
        finally:
            self._state = State.CLOSED
            self._ws = None
            code, reason = self._close_frame
            self._fail_all(ConnectionClosed(code, reason))

    async def _serve(
        self, ws: ClientConnection, away: _Away | None, retries: int
    ) -> tuple[int, str]:
        """Run one connection: resync, flush the queue, read until it ends. Returns the
        close code and reason. `retries`: the attempts since the drop (0 for the first
        connection)."""
        self._ws = ws
        self._state = State.RESYNCING
        reader = asyncio.create_task(self._read(ws), name="shoal-client-reader")
        self._emit("connected", Connected(self.url, ws.subprotocol, away is not None))
        try:
            rejoined, resubscribed = await self._resync()
            sent = await self._flush(ws)
        except (ConnectionClosed, WebSocketClosed):
            pass  # the reader has the close code
        else:
            if not reader.done():
                self._state = State.OPEN
                self._opened.set()
                if away is not None:
                    self._emit(
                        "reconnected",
                        Reconnected(
                            downtime=self._clock() - away.since,
                            attempts=retries,
                            rejoined=rejoined,
                            resubscribed=resubscribed,
                            sent=sent,
                            dropped=self._dropped_since(away),
                        ),
                    )
        code, reason = await reader
        self._ws = None
        return code, reason

    async def _resync(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Join the rooms and channels again and set the metadata, before anything queued
        goes out (each one a request: its reply confirms it). A room with a position is
        joined from it (`since`): what the room said meanwhile arrives before the reply.
        A room the server now refuses is forgotten and the refusal goes to the `error`
        callbacks."""
        rooms, channels, metadata = list(self._rooms), list(self._channels), self._metadata
        if not (rooms or channels or metadata):
            return (), ()
        loop = asyncio.get_running_loop()
        exchanges: list[tuple[str, str, _Request]] = []
        for kind, name in [("room", r) for r in rooms] + [("channel", c) for c in channels]:
            message: dict[str, Any] = (
                {"type": "join_room", "room": name}
                if kind == "room"
                else {"type": "subscribe", "channel": name}
            )
            if kind == "room" and (position := self._positions.resuming(name)) is not None:
                message["since"] = position.since()
            reply = "joined_room" if kind == "room" else "subscribed"
            exchanges.append((kind, name, _Request(message, reply, loop.create_future())))
        if metadata:
            message = {"type": "set_metadata", "metadata": metadata}
            request = _Request(message, "metadata_updated", loop.create_future())
            exchanges.append(("metadata", "", request))
        ws = self._ws
        assert ws is not None
        for _, _, request in exchanges:
            self._awaiting.append(request)
            await ws.send(wire.encode(request.message))
        outcomes = await asyncio.gather(
            *(request.future for _, _, request in exchanges), return_exceptions=True
        )
        done: dict[str, list[str]] = {"room": [], "channel": []}
        for (kind, name, _), outcome in zip(exchanges, outcomes, strict=True):
            if isinstance(outcome, ConnectionClosed):
                raise outcome
            if isinstance(outcome, BaseException):
                self._emit("error", outcome)
                if kind == "room":
                    self._rooms.pop(name, None)
                    self._positions.forget(name)
                else:
                    self._channels.pop(name, None)
            elif kind in done:
                done[kind].append(name)
        return tuple(done["room"]), tuple(done["channel"])

    async def _flush(self, ws: ClientConnection) -> int:
        """Send the queue in order. A message leaves the queue only once sent."""
        sent = 0
        while self._queue:
            item = self._queue[0]
            if item.request is not None:
                self._awaiting.append(item.request)
            try:
                await ws.send(item.frame)
            except WebSocketClosed:
                if item.request is not None:
                    self._awaiting.remove(item.request)
                raise
            if self._queue and self._queue[0] is item:
                self._queue.popleft()
            sent += 1
        return sent

    async def _read(self, ws: ClientConnection) -> tuple[int, str]:
        """Read until the connection ends; hand each message on. Returns the close code
        and reason (1006 when no close frame came)."""
        try:
            async for raw in ws:
                self._receive(raw)
        except WebSocketClosed:
            pass
        if ws.close_code is None:  # pragma: no cover - websockets sets it once closed
            return 1006, ""
        # A request sent on this connection will never get its reply now.
        error = ConnectionClosed(ws.close_code, ws.close_reason or "")
        while self._awaiting:
            request = self._awaiting.popleft()
            if not request.future.done():
                request.future.set_exception(error)
        return ws.close_code, ws.close_reason or ""

    def _receive(self, raw: wire.Data) -> None:
        if isinstance(raw, bytes):
            self._emit("binary", raw)
            return
        try:
            value = json.loads(raw)
        except ValueError:
            self._emit("message", raw)
            return
        if not isinstance(value, dict):
            self._emit("message", value)
            return
        kind = value.get("type")
        self._track(kind, value)
        claimed = self._settle(kind, value)
        self._emit("message", value)
        if kind == "error" and not claimed:
            self._emit("error", ErrorReply(str(value.get("message"))))
        elif isinstance(kind, str) and kind not in EVENTS:
            self._emit(kind, value)
        if kind == "joined_room" and value.get("recovered") is False:
            failed = RecoveryFailed(str(value.get("room")), str(value.get("reason", "")))
            self._emit("recovery_failed", failed)

    def _track(self, kind: Any, message: dict[str, Any]) -> None:
        """Keep what a reconnection must restore, as the server confirms it, and where the
        client stands in each room (a message of a room names it in `room`)."""
        room = message.get("room")
        if kind == "joined_room":
            self._rooms[str(room)] = None
            self._positions.joined(message)
        elif kind == "left_room":
            self._rooms.pop(str(room), None)
            self._positions.forget(str(room))
        elif kind == "subscribed":
            self._channels[str(message.get("channel"))] = None
        elif kind == "unsubscribed":
            self._channels.pop(str(message.get("channel")), None)
        elif kind == "metadata_updated" and isinstance(message.get("metadata"), dict):
            self._metadata = message["metadata"]
        elif isinstance(room, str):
            # A room being joined too: what the server held during the join comes
            # before its `joined_room`, after the offset the reply gives.
            self._positions.saw(room, message)

    def _settle(self, kind: Any, message: dict[str, Any]) -> bool:
        """Give `message` to the request it answers; whether one claimed it."""
        if kind == "error":
            if not self._awaiting:
                return False
            request = self._awaiting.popleft()
            _resolve(request, exception=ErrorReply(str(message.get("message"))))
            return not request.placeholder
        for request in self._awaiting:
            if request.expected == kind and wire.answers(request.message, message):
                self._awaiting.remove(request)
                if request.task and not request.future.done():
                    request.task_id = str(message.get("task_id"))
                    self._tasks[request.task_id] = request
                else:
                    _resolve(request, result=message)
                return True
        if kind in ("task_result", "task_failed"):
            outcome_of = self._tasks.pop(str(message.get("task_id")), None)
            if outcome_of is None:
                return False
            request = outcome_of
            if kind == "task_result":
                _resolve(request, result=message)
            else:
                error = message.get("error") or {}
                failure = TaskFailed(
                    str(request.task_id), str(error.get("type")), str(error.get("message"))
                )
                _resolve(request, exception=failure)
            return True
        return False

    async def _submit(self, item: _Queued) -> bool:
        """Send now when open with nothing queued before (True); else queue (False)."""
        if self._closing or self._state is State.CLOSED:
            code, reason = self._close_frame
            raise ConnectionClosed(code, reason)
        ws = self._ws
        if self._state is State.OPEN and not self._queue and ws is not None:
            if item.request is not None:
                self._awaiting.append(item.request)
            try:
                await ws.send(item.frame)
                return True
            except WebSocketClosed:
                # The drop is not processed yet: keep the message for the next connection.
                if item.request is not None and item.request in self._awaiting:
                    self._awaiting.remove(item.request)
        if len(self._queue) >= self.max_queue:
            if self.queue_policy == "raise" or not self._queue:
                raise QueueFull(f"{len(self._queue)} messages queued (max_queue)")
            dropped = self._queue.popleft()
            self._dropped += 1
            if dropped.request is not None:
                _resolve(dropped.request, exception=QueueFull("dropped from the full queue"))
        self._queue.append(item)
        return False

    def _forget(self, item: _Queued) -> None:
        """Take a finished or abandoned request out of the queue (never sent, then) and
        out of the tasks whose outcome is awaited."""
        with contextlib.suppress(ValueError):
            self._queue.remove(item)
        if item.request is not None and item.request.task_id is not None:
            self._tasks.pop(item.request.task_id, None)

    def _fail_all(self, error: ClientError) -> None:
        for request in [*self._awaiting, *self._tasks.values()]:
            _resolve(request, exception=error)
        for item in self._queue:
            if item.request is not None:
                _resolve(item.request, exception=error)
        self._awaiting.clear()
        self._tasks.clear()

    def _dropped_since(self, away: _Away) -> int:
        return self._dropped - away.dropped

    async def _pause(self, delay: float) -> None:
        """Sleep `delay` seconds, or less if `close()` is called meanwhile."""
        self._wake.clear()
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()

    # Callbacks

    def _emit(self, event: str, payload: Any) -> None:
        if event in self._handlers:
            self._events.put_nowait((event, payload))

    async def _dispatch(self) -> None:
        while (item := await self._events.get()) is not None:
            event, payload = item
            for callback in list(self._handlers.get(event, ())):
                try:
                    result = callback(payload)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    if event == "error":
                        # An error callback that fails has nobody left to tell.
                        logger.debug("error callback %r failed", callback, exc_info=True)
                    else:
                        self._emit("error", exc)


def _resolve(
    request: _Request,
    *,
    result: dict[str, Any] | None = None,
    exception: BaseException | None = None,
) -> None:
    if request.future.done():
        return
    if request.placeholder:
        request.future.cancel()
        return
    if exception is not None:
        request.future.set_exception(exception)
    else:
        assert result is not None
        request.future.set_result(result)


def _hopeless(error: ConnectFailed, exc: BaseException) -> bool:
    """Whether retrying the same handshake cannot succeed: the token was refused (401),
    the user or origin is banned (403), the request is wrong (other 4xx), or the server's
    certificate is not trusted."""
    if isinstance(error, AuthenticationFailed):
        return True
    if isinstance(error, HandshakeRefused):
        return error.status not in _RETRY_STATUSES and error.status < 500
    return isinstance(exc, ssl.SSLCertVerificationError)
