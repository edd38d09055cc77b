"""One benchmark WebSocket connection on picows, and opening it with failure causes.

Frames are handed whole to a :class:`MessageSink` as raw bytes, so scenario code
decides whether (and how) to parse. Opening classifies every failure into a
short cause string (``refused``, ``http_503``, ``timeout``, ``reset`` ...) that
the final table counts.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

import orjson
from picows import (
    WSCloseCode,
    WSFrame,
    WSHandshakeError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from shoal.bench import pusherwire
from shoal.core import schema

logger = logging.getLogger(__name__)

_DATA_TYPES = (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION)

# The schema names the `type` of each server message once, in SERVER_TYPES: read it back there.
_TYPE_OF: dict[type[Any], str] = {kind: name for name, kind in schema.SERVER_TYPES.items()}

_Message = TypeVar("_Message", bound=Mapping[str, object])


def server_type(kind: type[Any]) -> str:
    """The ``type`` of the schema's server message ``kind`` (``schema.Welcome``: ``"welcome"``).

    Raises:
        KeyError: ``kind`` is not one of the schema's server messages.
    """
    return _TYPE_OF[kind]


class ClosedEarlyError(ConnectionError):
    """The server closed the connection before an awaited setup reply."""


class RefusedError(Exception):
    """The server answered a setup step with a refusal; ``cause`` names it for the
    failure counts (``pusher_4001``)."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class MessageSink(Protocol):
    """Receives complete messages and unexpected disconnects of clients."""

    def on_message(self, client: Client, payload: bytes) -> None:
        """Handle one complete message (text or binary) received by ``client``."""

    def on_disconnect(self, client: Client) -> None:
        """Handle ``client`` being closed by the peer or the network."""


class Client(WSListener):
    """A picows listener bound to a global connection index."""

    def __init__(self, index: int, sink: MessageSink) -> None:
        super().__init__()
        self.index = index
        self.sink = sink
        self.transport: WSTransport | None = None
        self.closing = False
        self.disconnected = False
        self.socket_id: str | None = None
        """Pusher only: the id `pusher:connection_established` gave this connection."""
        self._parts: list[bytes] = []
        self._awaited_field = "type"
        self._awaited: frozenset[str] = frozenset()
        self._needles: tuple[bytes, ...] = ()
        self._waiter: asyncio.Future[Any] | None = None
        self._forward = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind in _DATA_TYPES:
            if frame.fin and not self._parts:
                self._deliver(frame.get_payload_as_bytes())
                return
            # Servers may fragment large messages; reassemble before delivering.
            self._parts.append(frame.get_payload_as_bytes())
            if frame.fin:
                payload = b"".join(self._parts)
                self._parts.clear()
                self._deliver(payload)
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ClosedEarlyError("closed before reply"))
        if not self.closing:
            self.sink.on_disconnect(self)

    def send(self, payload: bytes) -> None:
        """Send one text frame (picows masks it)."""
        if self.transport is not None and not self.disconnected:
            self.transport.send(WSMsgType.TEXT, payload)

    def close(self) -> None:
        """Close politely; later disconnect callbacks are not reported as drops."""
        self.closing = True
        if self.transport is not None and not self.disconnected:
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()

    def expect(self, kind: type[_Message], *, forward: bool = False) -> asyncio.Future[_Message]:
        """Future of the next message of the schema's server message ``kind``.

        ``kind`` is a class of :mod:`shoal.core.schema` (``schema.Welcome``); the
        future's result is the decoded message with that ``type``, not validated
        further: the server under test is not trusted, so read its fields with care.

        Arm it before the message can arrive (before connecting, before sending
        the request). Other messages arriving meanwhile are discarded, as they are
        during setup (welcome, joined_room) before measured traffic; with ``forward``
        they go to the sink instead, as the replay before a resumed join's reply must.
        """
        return self._arm("type", (server_type(kind),), forward)

    def expect_event(self, *events: str) -> asyncio.Future[dict[str, Any]]:
        """Future of the next Pusher frame whose ``event`` is one of ``events`` (the
        one awaited, and the refusals that may come instead), decoded, not validated.
        Arm it as :meth:`expect`; other frames meanwhile are discarded likewise."""
        return self._arm("event", events, False)

    def _arm(self, field: str, values: tuple[str, ...], forward: bool) -> asyncio.Future[Any]:
        self._forward = forward
        self._awaited_field = field
        self._awaited = frozenset(values)
        self._needles = tuple(value.encode() for value in values)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        return waiter

    def _deliver(self, payload: bytes) -> None:
        waiter = self._waiter
        if waiter is None:
            self.sink.on_message(self, payload)
            return
        # Only setup replies are awaited: a substring test skips parsing anything else.
        if not any(needle in payload for needle in self._needles):
            if self._forward:
                self.sink.on_message(self, payload)
            return
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict) or message.get(self._awaited_field) not in self._awaited:
            if self._forward:
                self.sink.on_message(self, payload)
            return
        self._waiter = None
        self._awaited = frozenset()
        self._needles = ()
        if not waiter.done():
            waiter.set_result(message)


async def open_client(
    url: str,
    index: int,
    sink: MessageSink,
    limit_s: float,
    wait_welcome: bool,
    *,
    pusher: bool = False,
) -> tuple[Client | None, str | None, int]:
    """Connect (and wait for the welcome if asked) within ``limit_s`` seconds.

    With ``pusher`` the welcome is `pusher:connection_established`, whose ``socket_id``
    the client keeps; a `pusher:error` instead is a failure, ``pusher_<code>``.

    Returns ``(client, None, handshake_ns)`` on success or ``(None, cause, elapsed_ns)``.
    """
    started = time.monotonic_ns()
    client = Client(index, sink)
    # Armed before connecting: the welcome may arrive in the same read as the 101.
    welcome: asyncio.Future[Any] | None = None
    if wait_welcome:
        if pusher:
            welcome = client.expect_event(pusherwire.ESTABLISHED, pusherwire.ERROR)
        else:
            welcome = client.expect(schema.Welcome)
    try:
        async with asyncio.timeout(limit_s):
            await ws_connect(lambda: client, url, websocket_handshake_timeout=None, max_redirects=0)
            if welcome is not None:
                message = await welcome
                if pusher:
                    client.socket_id = _socket_id(message)
    except Exception as exc:
        client.close()
        return None, failure_cause(exc), time.monotonic_ns() - started
    return client, None, time.monotonic_ns() - started


def _socket_id(message: dict[str, Any]) -> str:
    if message.get("event") == pusherwire.ERROR:
        code, _ = pusherwire.error(message)
        raise RefusedError(f"pusher_{code if code is not None else 'error'}")
    try:
        return pusherwire.socket_id(message)
    except ValueError:
        raise RefusedError("bad_welcome") from None


def failure_cause(exc: BaseException) -> str:
    """Short, stable label for why a connection attempt failed."""
    if isinstance(exc, RefusedError):
        return exc.cause
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, WSHandshakeError):
        if exc.response is not None:
            return f"http_{int(exc.response.status)}"
        return "handshake"
    if isinstance(exc, ClosedEarlyError):
        return "closed_early"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return "fd_limit"
        if exc.errno == errno.EADDRNOTAVAIL:
            return "no_local_ports"
        return f"os_{errno.errorcode.get(exc.errno, str(exc.errno)).lower()}"
    logger.debug("unclassified connection failure: %r", exc)
    return type(exc).__name__.lower()
