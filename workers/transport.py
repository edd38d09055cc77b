"""The worker's connections: an asyncio protocol on uvloop driving websockets' sans-I/O core.

`websockets.server.ServerProtocol` does the protocol work (HTTP handshake, framing,
masking, limits, the closing handshake, permessage-deflate); this module does the I/O
around it with no task and no queue per connection: bytes arrive in `data_received`,
go through the protocol, and each complete message goes straight to the worker's
`received()` callback. Messages are assembled here from their frames (with UTF-8
checked as fragments arrive, so an invalid text message fails at its first bad byte).

A connection whose first byte is not `G` cannot be a handshake: only a GET can be, and no
other HTTP method begins with G. Its first read hands it to a plain HTTP `Exchange`
(`shoal.workers.exchange`), which serves requests with bodies (websockets' parser
refuses them) with whatever the handlers' `responder()` gives.

Timers bound the two handshakes: a client that has not completed the opening handshake
within `open_timeout`, or the closing handshake within `close_timeout` after it started,
is dropped.

With permessage-deflate negotiated, frames go to websockets one at a time, and what they
inflate to is charged to the connection's `inflation.Budget`: reading from the client
stops while the budget is spent, and after each `_TURN` bytes inflated, so that one
client's small frames that inflate a thousandfold can neither stall the loop for the
others nor pile up inflated messages in memory.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import CloseCode as WsCloseCode
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED, CONNECTING, OPEN, State
from websockets.server import ServerProtocol

from shoal.core.metrics import counters
from shoal.core.protocol import frames_end, whole_messages
from shoal.workers import exchange
from shoal.workers.exchange import Exchange, Exchanges, Responder
from shoal.workers.inflation import Budget, frame_size

logger = logging.getLogger(__name__)

# websockets logs every handshake and close at INFO on its own logger; shoal reports what
# matters itself.
_QUIET = logging.getLogger("shoal.workers.transport.protocol")
_QUIET.setLevel(logging.WARNING)

_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")

# Inflated bytes a compressed connection may have handled in one turn of the event loop
# before it lets the other connections run: a few milliseconds of inflating, parsing and
# answering (a message larger than this is still handled whole).
_TURN = 256 * 1024
# The server's LZ77 window, the largest window it lets a client use, and zlib's memLevel
# for the server's compressor: about 61 KiB per connection once both contexts are in use,
# against 94 KiB when a client may choose a 32 KiB window, and 320 KiB with zlib's own
# defaults (measured with tracemalloc). These are websockets' defaults, stated here;
# a client that cannot limit its window (it does not offer `client_max_window_bits`,
# which browsers, websockets and Node's ws do) gets no compression.
_WINDOW_BITS = 12
_MEM_LEVEL = 5


class Deferred:
    """The type of `DEFER`: a handshake decided later (`WebSocket.respond()`)."""

    __slots__ = ()


DEFER = Deferred()


class Handlers(Protocol):
    """What the worker does for each connection (`shoal.workers.worker.Worker`)."""

    def made(self, ws: WebSocket) -> None:
        """A TCP connection was accepted; its handshake is to come."""

    def responder(self, ws: WebSocket) -> Responder | None:
        """The connection's first read cannot begin a handshake (its first byte is not
        `G`): what answers its plain HTTP requests. None: nothing is served, the first
        request gets 405 (`exchange.refuse`), and the connection closes.

        `lost(ws)` follows at once: the connection is the exchange's from then on.
        """

    @property
    def exchanges(self) -> Exchanges:
        """The connections `responder` made plain HTTP exchanges, for the worker's stop."""

    def route(self, ws: WebSocket, request: Request) -> Response | Deferred | None:
        """Answer a plain HTTP request or refuse a handshake; None to accept it; `DEFER`
        to decide later, with `ws.respond()` (reading from the client pauses meanwhile)."""

    def opened(self, ws: WebSocket, request: Request) -> None:
        """The opening handshake of `request` completed (the 101 is sent or corked).

        `request.headers` is emptied when this returns: read what is needed now.
        """

    def received(self, ws: WebSocket, data: str | bytes) -> None:
        """A complete message arrived, in order."""

    def lost(self, ws: WebSocket) -> None:
        """The TCP connection is gone, whatever the cause; called once."""

    def overflowed(self, ws: WebSocket) -> None:
        """More than `Settings.max_buffer` bytes wait to be sent to the client."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Limits of every connection of a worker (`server.*` in the config)."""

    max_size: int
    max_buffer: int
    open_timeout: float
    close_timeout: float
    compression: bool
    extensions: list[ServerExtensionFactory] = field(default_factory=list)
    origins: list[str | None] | None = None
    """Acceptable `Origin` headers (None: a request without one); None: any."""
    select_subprotocol: Callable[[Sequence[str]], str | None] | None = None
    """Picks the `Sec-WebSocket-Protocol` to answer from the client's offers."""
    inflate_rate: int = 4 * 1024 * 1024
    """Inflated bytes per second a compressed connection may send (`inflation.Budget`)."""
    http_max_head: int = exchange.MAX_HEAD
    """Bytes of a plain HTTP request's line and headers (`Exchange`); 431 past it. Such a
    request has `open_timeout` seconds to arrive whole."""
    http_max_body: int = exchange.MAX_BODY
    """Bytes of a plain HTTP request's body; 413 past it."""
    http_idle_timeout: float = exchange.IDLE_TIMEOUT
    """Seconds a plain HTTP connection is kept open for its next request."""

    @classmethod
    def make(
        cls,
        max_size: int,
        max_buffer: int,
        open_timeout: float,
        close_timeout: float,
        compression: bool,
        *,
        allowed_origins: Sequence[str] | None = None,
        select_subprotocol: Callable[[Sequence[str]], str | None] | None = None,
        inflate_rate: int = 4 * 1024 * 1024,
    ) -> Settings:
        """Settings from the config's values.

        Args:
            allowed_origins: `server.allowed_origins`. A handshake from a browser on
                another origin is refused with 403; one without an `Origin` header (not
                from a browser) is accepted, since cross-site hijacking needs a browser.
            inflate_rate: `server.websocket_inflate_rate`.
        """
        extensions: list[ServerExtensionFactory] = []
        if compression:
            deflate = ServerPerMessageDeflateFactory(
                server_max_window_bits=_WINDOW_BITS,
                client_max_window_bits=_WINDOW_BITS,
                compress_settings={"memLevel": _MEM_LEVEL},
                require_client_max_window_bits=True,
            )
            extensions.append(deflate)
        origins: list[str | None] | None = None
        if allowed_origins is not None:
            origins = [*allowed_origins, None]
        return cls(
            max_size,
            max_buffer,
            open_timeout,
            close_timeout,
            compression,
            extensions,
            origins,
            select_subprotocol,
            inflate_rate,
        )


class _ServerProtocol(ServerProtocol):
    """websockets' server protocol, but a close frame may end a fragmented message.

    RFC 6455 lets control frames arrive between the fragments of a message; websockets
    fails the connection with 1002 when that control frame is a close. The unfinished
    message is dropped instead and the closing handshake completes (Autobahn case
    7.1.5). `current_size` and `recv_frame()` are checked by the contract tests.
    """

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CLOSE:
            self.current_size = None
        super().recv_frame(frame)


class WebSocket(asyncio.Protocol):
    """One client connection.

    Attributes:
        protocol: websockets' sans-I/O state machine for it.
        transport: the TCP transport, None once the connection is gone.
        last_seen: loop time when anything last arrived from the client.
        session: what the worker attaches to it (its `Connection`).
        pending: while a read is being handled or the connection is corked, what is
            written to the client meanwhile (None otherwise): it goes out in one send()
            when the read is done or at `uncork()`.
    """

    __slots__ = (
        "_budget",
        "_corked",
        "_decoder",
        "_deferred",
        "_drain_handle",
        "_eof",
        "_failed",
        "_fast",
        "_first",
        "_fragments",
        "_held",
        "_inflated",
        "_lost",
        "_partial",
        "_paused",
        "_timer",
        "admitted",
        "client",
        "handlers",
        "identity",
        "last_seen",
        "loop",
        "pending",
        "protocol",
        "replying",
        "session",
        "settings",
        "slot",
        "transport",
    )

    def __init__(self, handlers: Handlers, settings: Settings) -> None:
        self.handlers = handlers
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        select = settings.select_subprotocol
        self.protocol: ServerProtocol = _ServerProtocol(
            origins=settings.origins,  # type: ignore[arg-type]  # str is websockets' Origin
            extensions=settings.extensions or None,
            select_subprotocol=None if select is None else lambda _, offered: select(offered),  # type: ignore[arg-type,return-value]
            max_size=settings.max_size,
            logger=_QUIET,
        )
        self.transport: asyncio.Transport | None = None
        self.session: Any = None
        self.identity: Any = None
        """Who the client is, from its handshake until the worker makes its session."""
        self.admitted = False
        self.client: str | None = None
        """The client's address as a trusted proxy forwarded it; None: the TCP peer's."""
        self.slot: tuple[str, str] | None = None
        """(client address, connection id) while it holds a slot of the address limits."""
        # A handshake decided later (`respond()`): [its request, the events that followed
        # it in the same read (frames a client should not have sent yet), whether the
        # read ended with the request (see `_received`)].
        self._deferred: list[Any] | None = None
        # The close frame waits while replies to what came before it go out.
        self.replying = False
        self.pending: list[bytes] | None = None
        self.last_seen = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._fragments: list[Any] | None = None
        self._decoder: Any = None
        self._lost: asyncio.Future[None] | None = None
        # Nothing was read yet: the first read decides between websockets and plain HTTP.
        self._first = True
        # The fast path for whole messages (`_fast_path`), and the start of a frame it
        # holds back until the frame is whole.
        self._fast = False
        self._held = b""
        self._failed = False
        self._corked = False
        # With compression (`_metered`): the connection's budget, the bytes of data
        # frames websockets has delivered (inflated), the bytes of the frame it has begun
        # that it has not been given yet, the handle of the call that goes on with what
        # is held back, and an end of stream that waits for it.
        self._budget: Budget | None = None
        self._inflated = 0
        self._partial = 0
        self._drain_handle: asyncio.Handle | None = None
        self._eof = False
        # The worker does not want to read from the client (`pause_reading()`).
        self._paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.last_seen = self.loop.time()
        self._timer = self.loop.call_later(self.settings.open_timeout, self._too_slow, "opening")
        self.handlers.made(self)

    def data_received(self, data: bytes) -> None:
        if self.pending is not None:  # corked: it all goes out at `uncork()`
            self._received(data)
            return
        # One read often holds several messages (a client that pipelines): their replies
        # are joined and written once, after the read is handled, rather than with a
        # send() each, which was a fourth of the cost of an echo.
        pending: list[bytes] = []
        self.pending = pending
        try:
            self._received(data)
        finally:
            if not self._corked:
                self.pending = None
                self._write_out(pending)

    def cork(self) -> None:
        """Hold everything written to the client, from the protocol too, until `uncork()`.

        The worker corks a connection from its handshake until it is registered, so
        that the 101 and the application's first messages (the welcome) leave in one
        send(), and the 101 only once the connection's state is in Redis.
        """
        self._corked = True
        if self.pending is None:
            self.pending = []

    def uncork(self) -> None:
        """Write what `cork()` held, in one send()."""
        self._corked = False
        pending, self.pending = self.pending, None
        if pending:
            self._write_out(pending)

    def _write_out(self, pending: list[bytes]) -> None:
        """Write held data at once; the client is a slow consumer if too much is unsent."""
        if not pending:
            return
        self._flush(pending)
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > self.settings.max_buffer:
            self.handlers.overflowed(self)

    def _received(self, data: bytes) -> None:
        counters.bytes_in += len(data)
        self.last_seen = self.loop.time()
        if self._fast:
            data = self._fast_path(data)
            if not data:
                return
        elif self._budget is not None:
            self._metered(data)
            return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """Give `data` to websockets and handle what it makes of it."""
        protocol = self.protocol
        opening = protocol.state is CONNECTING
        if opening and self._first:  # never again once a read is handled
            self._first = False
            if data[:1] != b"G":
                self._exchange(data)
                return
        protocol.receive_data(data)
        events = protocol.events_received()
        if protocol.state is OPEN or protocol.state is CONNECTING:
            # Pongs first, as websockets' own connections do.
            self._send_data()
            self._deliver(events)
            if opening and (protocol.state is OPEN or self._deferred is not None):
                # The fast path needs websockets' parser between frames: it is if the
                # request ended where this read ends, as when a client waits for the 101
                # (RFC 6455, 4.1). The request ends at its first blank line, which cannot
                # have begun in an earlier read when this one starts with "GET ".
                # Otherwise websockets parses everything, as it does with compression.
                whole = data[:4] == b"GET " and data.find(b"\r\n\r\n") == len(data) - 4
                if self._deferred is not None:
                    self._deferred[2] = whole
                else:
                    self._fast = whole and not protocol.extensions
                    self._meter()
            return
        # A close frame is queued (the client's, or a bad frame after good ones): the
        # replies to the messages before it must precede it on the wire. Those whose
        # handlers wait (for the connection's registration, say) hold it back until
        # the worker calls `replied()`.
        self.replying = True
        self._deliver(events)
        if self.session is None or not self.session.busy:
            self.replied()
        elif self._timer is None:
            self._timer = self.loop.call_later(
                self.settings.close_timeout, self._too_slow, "closing"
            )

    def _exchange(self, data: bytes) -> None:
        """Hand the connection, with `data`, its first read, to a plain HTTP exchange."""
        transport = self.transport
        assert transport is not None
        if self._timer is not None:  # the opening handshake's timer
            self._timer.cancel()
            self._timer = None
        handlers = self.handlers
        settings = self.settings
        responder = handlers.responder(self)
        served = Exchange(
            exchange.refuse if responder is None else responder,
            handlers.exchanges,
            max_head=settings.http_max_head,
            max_body=settings.http_max_body,
            request_timeout=settings.open_timeout,
            idle_timeout=settings.http_idle_timeout,
        )
        self.transport = None
        transport.set_protocol(served)
        served.adopt(transport, data)
        # Gone, for whoever waits for it and for the handlers (their count of handshakes
        # under way stays right).
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        handlers.lost(self)

    def replied(self) -> None:
        """Every message received before the close has been answered: send the close."""
        if self.replying:
            self.replying = False
            self._send_data()

    def _deliver(self, events: list[Any]) -> None:
        for event in events:
            if self._failed:  # invalid UTF-8: what followed it is discarded, as websockets does
                return
            if self._deferred is not None:
                self._deferred[1].append(event)
            elif type(event) is Frame:
                self._frame(event)
            else:
                self._handshake(cast(Request, event))

    def eof_received(self) -> bool | None:
        if self._drain_handle is not None or (self._paused and self._held):
            self._eof = True  # after the frames held back (`_drain`)
            return True
        self.protocol.receive_eof()
        self.protocol.events_received()
        self._send_data()
        return None  # nothing is written after the client's EOF: close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent: the state becomes CLOSED
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        self._held = b""
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self.handlers.lost(self)

    # What the worker calls

    @property
    def state(self) -> State:
        return self.protocol.state

    @property
    def is_open(self) -> bool:
        return self.protocol.state is OPEN

    @property
    def compressed(self) -> bool:
        """Whether permessage-deflate was negotiated (frames cannot be shared then)."""
        return bool(self.protocol.extensions)

    @property
    def remote_address(self) -> str:
        """`host:port` of the TCP peer, or "" when unknown."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else ""

    @property
    def remote_host(self) -> str:
        """The TCP peer's host, or "" when unknown."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else ""

    def close_code(self) -> tuple[int, bool]:
        """How the connection closed: the code of the close frame that began the closing
        handshake (1006 when none was exchanged), and whether this server sent it."""
        protocol = self.protocol
        if protocol.close_rcvd_then_sent:  # the client's, echoed
            assert protocol.close_rcvd is not None
            return protocol.close_rcvd.code, False
        if protocol.close_sent is not None:
            return protocol.close_sent.code, True
        return WsCloseCode.ABNORMAL_CLOSURE, False

    def write(self, frames: bytes) -> None:
        """Write whole pre-built (unmasked, uncompressed) frames, unconditionally."""
        counters.bytes_out += len(frames)
        if self.pending is not None:
            self.pending.append(frames)
        elif self.transport is not None:
            self._write(self.transport, frames)

    def send(self, payload: bytes, *, text: bool) -> None:
        """Send one message through the protocol (compressed if negotiated)."""
        if text:
            self.protocol.send_text(payload)
        else:
            self.protocol.send_binary(payload)
        self._send_data()

    def buffered(self) -> int:
        """Bytes written and not yet sent to the client."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; drop the connection if it is not done within
        `close_timeout` (a client that stopped reading never completes it)."""
        protocol = self.protocol
        if protocol.state is OPEN:
            protocol.send_close(code, reason)
            self._send_data()
        elif protocol.state is CONNECTING and self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        """Return once the TCP connection is gone."""
        if self.transport is None:
            return
        if self._lost is None:
            self._lost = self.loop.create_future()
        await asyncio.shield(self._lost)

    @property
    def reading_paused(self) -> bool:
        """Whether this server stopped reading the client (`pause_reading()`, or a spent
        inflation budget): what the client sends meanwhile waits, unseen."""
        return self._paused or self._drain_handle is not None

    def pause_reading(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self.transport is None or self._drain_handle is not None:
            return  # the budget is spent: `_drain` resumes reading
        if self._held and self._budget is not None:
            self._wait(0.0)  # frames were held back meanwhile: they come first
        else:
            self.transport.resume_reading()

    # Inside

    def _flush(self, pending: list[bytes]) -> None:
        """Write what is held (replies, and the protocol's own data after them) in one
        send()."""
        transport = self.transport
        if transport is not None:
            self._write(transport, pending[0] if len(pending) == 1 else b"".join(pending))
        pending.clear()

    @staticmethod
    def _write(transport: asyncio.Transport, data: bytes) -> None:
        """Write `data`, unless the peer reset the connection in this turn of the loop:
        uvloop then closed the transport and calls `connection_lost` next, and a write
        would raise RuntimeError into whoever wrote (a fan-out to other clients)."""
        with contextlib.suppress(RuntimeError):
            transport.write(data)

    def _send_data(self) -> None:
        transport = self.transport
        if transport is None:
            return
        pending = self.pending
        for data in self.protocol.data_to_send():
            if data:
                counters.bytes_out += len(data)
                if pending is not None:  # in order after what is held, and with it
                    pending.append(data)
                else:
                    self._write(transport, data)
                continue
            if pending:  # all that precedes the end of the stream goes first
                self._flush(pending)
            if transport.can_write_eof():
                # The end of the stream after a close frame or a refused handshake.
                try:
                    transport.write_eof()
                except (OSError, RuntimeError):  # uvloop raises RuntimeError if closing
                    transport.abort()
            else:
                transport.close()
        if self._timer is None and self.protocol.close_expected():
            self._timer = self.loop.call_later(
                self.settings.close_timeout, self._too_slow, "closing"
            )

    def _too_slow(self, what: str) -> None:
        self._timer = None
        if self.transport is not None:
            logger.debug("dropping a connection: %s handshake timed out", what)
            self.transport.abort()

    def _handshake(self, request: Request) -> None:
        if self.protocol.eof_sent:
            # Frames came with the request that websockets refused before the handshake
            # was answered (compressed ones, say: compression is not negotiated yet). The
            # connection failed and its end of stream is sent: nothing may follow it.
            return
        response = self.handlers.route(self, request)
        if response is DEFER:
            self._deferred = [request, [], False]
            self.pause_reading()
            return
        self._answer(request, response)  # type: ignore[arg-type]  # not DEFER

    def respond(self, response: Response | None) -> None:
        """Answer the handshake `route()` deferred: `response` refuses it, None accepts it.

        What the client sent after its request is then handled, and reading resumes.
        """
        deferred, self._deferred = self._deferred, None
        if deferred is None or self.transport is None:
            return
        request, early, whole = deferred
        if self.pending is None:  # outside a read: what follows goes out in one send()
            self.pending = []
            try:
                self._answer(request, response)
                self._deliver(early)
            finally:
                if not self._corked:
                    pending, self.pending = self.pending, None
                    self._write_out(pending)
        else:
            self._answer(request, response)
            self._deliver(early)
        protocol = self.protocol
        self._fast = protocol.state is OPEN and whole and not early and not protocol.extensions
        self._meter()
        self.resume_reading()

    def _answer(self, request: Request, response: Response | None) -> None:
        protocol = self.protocol
        handlers = self.handlers
        if response is None:
            response = protocol.accept(request)
        protocol.send_response(response)
        if self._timer is not None:  # the opening handshake's timer
            self._timer.cancel()
            self._timer = None
        self._send_data()
        if protocol.state is OPEN:
            handlers.opened(self, request)
        # websockets' parser keeps the request for as long as the connection lives; its
        # headers, a dozen objects, would cost memory and the garbage collector's time
        # on every full collection. The worker reads them during the handshake only.
        request.headers.clear()

    def _meter(self) -> None:
        """Charge what this connection inflates to a budget, if compression was
        negotiated (the opening handshake is complete)."""
        if self.protocol.extensions and self._budget is None:
            self._budget = Budget(self.settings.inflate_rate, self.loop.time())

    def _metered(self, data: bytes) -> None:
        """Give websockets the frames of a compressed connection one at a time, and
        charge what each inflates to to the connection's budget.

        What follows is held back (and reading from the client stops) once the budget is
        spent, until it refills; once `_TURN` bytes were inflated in this turn of the
        loop, until the next; and while the worker does not read from the client.
        """
        if self._held:
            data = self._held + data  # at most one read: reading stopped when it was held
            self._held = b""
        budget = self._budget
        assert budget is not None
        end = len(data)
        at = turn = 0
        # Even while closing: websockets inflates what comes until the client's close.
        while at < end:
            if self._paused or self._drain_handle is not None:
                break
            partial = self._partial
            if partial:  # the rest of a frame that websockets has begun
                stop = min(end, at + partial)
            else:
                size = frame_size(data, at)
                if not size:  # its header is still arriving
                    break
                stop = min(end, at + size)
                partial = size
            self._partial = partial - (stop - at)
            before = self._inflated
            self._parse(data[at:stop] if at or stop < end else data)
            at = stop
            inflated = self._inflated - before
            if inflated:
                turn += inflated
                wait = budget.spend(inflated, self.loop.time())
                if wait or turn >= _TURN:
                    self._wait(wait)
        if at < end:
            self._held = data[at:]

    def _wait(self, delay: float) -> None:
        """Stop reading from the client; go on with what is held back after `delay`
        seconds (0: in the next turn of the loop)."""
        loop = self.loop
        self._drain_handle = (
            loop.call_later(delay, self._drain) if delay else loop.call_soon(self._drain)
        )
        if self.transport is not None:
            self.transport.pause_reading()

    def _drain(self) -> None:
        """Go on with the frames held back; read from the client again when none is."""
        self._drain_handle = None
        transport = self.transport
        if transport is None or self._paused:
            return  # gone, or `resume_reading()` calls this again
        if self.pending is not None:  # corked
            self._metered(b"")
        else:
            pending: list[bytes] = []
            self.pending = pending
            try:
                self._metered(b"")
            finally:
                if not self._corked:
                    self.pending = None
                    self._write_out(pending)
        if self._drain_handle is not None or self._paused or self.transport is None:
            return
        if self._eof:
            self._eof = False
            self.eof_received()
            transport.close()
        else:
            transport.resume_reading()

    def _fast_path(self, data: bytes) -> bytes:
        """Deliver the whole messages at the start of `data` (`protocol.whole_messages`);
        return the whole frames websockets must parse, holding back a frame still arriving.

        websockets is given whole frames only, so its parser is always between frames
        when the next read comes, and this path can take over again.
        """
        protocol = self.protocol
        if self._held:
            data = self._held + data
            self._held = b""
        at = 0
        if protocol.current_size is None:  # not inside a fragmented message
            for text, payload, stop in whole_messages(data, self.settings.max_size):
                if protocol.state is not OPEN:
                    break
                self._message(text, payload)
                at = stop
        if protocol.state is not OPEN:  # closing or failed: websockets decides what follows
            self._fast = False
            return data[at:]
        end = frames_end(data, at, self.settings.max_size)
        if end < len(data):
            self._held = data[end:]
        return data[at:end]

    def _message(self, text: bool, payload: bytes) -> None:
        """A message in one frame."""
        if text:
            try:
                decoded = payload.decode()
            except UnicodeDecodeError as exc:
                self._invalid(exc)
                return
            self.handlers.received(self, decoded)
        else:
            self.handlers.received(self, payload)

    def _frame(self, frame: Frame) -> None:
        self._inflated += len(frame.data)
        opcode = frame.opcode
        if opcode is _TEXT:
            if frame.fin:
                self._message(True, bytes(frame.data))
            else:
                self._decoder = _Utf8Decoder()
                self._fragments = []
                self._text_fragment(frame)
        elif opcode is _BINARY:
            if frame.fin:
                self._message(False, bytes(frame.data))
            else:
                self._decoder = None
                self._fragments = [frame.data]
        elif opcode is _CONT:
            self._continuation(frame)

    def _continuation(self, frame: Frame) -> None:
        fragments = self._fragments
        if fragments is None:  # the protocol refuses a stray continuation frame
            return
        if self._decoder is not None:
            if not self._text_fragment(frame) or not frame.fin:
                return
            message: str | bytes = "".join(fragments)
        else:
            fragments.append(frame.data)
            if not frame.fin:
                return
            message = b"".join(fragments)
        self._fragments = self._decoder = None
        self.handlers.received(self, message)

    def _text_fragment(self, frame: Frame) -> bool:
        assert self._fragments is not None
        try:
            self._fragments.append(self._decoder.decode(frame.data, final=frame.fin))
        except UnicodeDecodeError as exc:
            self._invalid(exc)
            return False
        return True

    def _invalid(self, exc: UnicodeDecodeError) -> None:
        self._fragments = self._decoder = None
        self._failed = True
        self.protocol.fail(WsCloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
        self._send_data()


def factory(handlers: Handlers, settings: Settings) -> Callable[[], WebSocket]:
    """The protocol factory for `loop.create_server()`."""

    def make() -> WebSocket:
        return WebSocket(handlers, settings)

    return make


__all__ = ["CLOSED", "DEFER", "Deferred", "Handlers", "Settings", "WebSocket", "factory"]
