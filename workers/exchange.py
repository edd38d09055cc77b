"""Plain HTTP/1.1 on the WebSocket port: request/response cycles served with h11.

A connection whose first byte cannot begin a WebSocket handshake becomes an `Exchange`
(`shoal.workers.transport` hands it over). h11, sans-I/O like websockets, parses each
request; the exchange reads it whole, body included, gives it to a `Responder`, writes
the answer and keeps the connection for the next request, until either side says
`Connection: close`. websockets' own parser cannot do this: it refuses request bodies,
and only a GET can be a handshake.

Order and flow: requests are answered one at a time, in the order they arrived. Reading
from the client pauses while a responder runs, so pipelined requests wait in the
kernel's buffers, not in the worker's memory.

Limits, each with a plain answer (a JSON body, `{"error": "payload too large"}`):
- a request head (request line and headers) over `max_head` bytes: 431;
- a body over `max_body` bytes: 413, as soon as `Content-Length` shows it (before any of
  the body is read, and before `100 Continue`), or once a chunked body passes it;
- a request that is not whole `request_timeout` seconds after its first byte: 408;
- anything h11 cannot parse: 400; a `CONNECT` (a tunnel): 405;
- no next request within `idle_timeout` seconds of an answer: the connection closes,
  with no answer;
- a responder that raises: 500, logged with its traceback; the request was read whole,
  so the connection goes on.

Each of these answers but the 500 ends the connection. Its end of stream is sent first, then
what the client still sends is read and discarded until it closes, for `_LINGER`
seconds at most: closing a socket with unread data resets the connection, and the
client, still uploading a refused body, could lose the answer.

A client that goes away while a responder runs costs nothing: the responder finishes and
its answer is dropped.

Stopping (`Exchanges.close`, when the worker stops or is replaced): a connection waiting
for its next request closes at once; a request under way, or one that has begun to
arrive, is still answered, with `Connection: close`, and its connection then closes. A
client's keep-alive pool sees the end of stream and opens its next connection to
another worker, so that a reload fails no request.

Counted: the bytes read and written (`counters.bytes_in`, `counters.bytes_out`), as the
WebSocket connections count theirs, and each answer by its status
(`counters.http_requests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import h11
import orjson

from shoal.core.metrics import counters

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
"""Default bytes of a request line and its headers (h11's own default)."""
MAX_BODY = 1024 * 1024
"""Default bytes of a request body."""
REQUEST_TIMEOUT = 10.0
"""Default seconds a request may take to arrive whole, from its first byte."""
IDLE_TIMEOUT = 10.0
"""Default seconds a connection may wait for its next request after an answer."""

# Seconds a closing connection keeps reading (and discarding) what the client sends,
# after its end of stream is sent: long enough for a client to read the answer and
# close, short enough that one uploading a refused body holds nothing for long.
_LINGER = 2.0

# Statuses whose answer has no body, and no Content-Length (RFC 9110, 8.6).
_BODILESS = frozenset({204, 304})
# Headers that frame a message: the exchange writes them itself.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
# The bodies of the exchange's own answers, `{"error": ...}`, worded here: Python's
# `http.HTTPStatus` phrases change between versions (413 is "Content Too Large" in 3.13).
# h11 asks for 400, 431 or 501 when it cannot parse a request.
_ERRORS = {
    400: "bad request",
    405: "method not allowed",
    408: "request timeout",
    413: "payload too large",
    431: "request header fields too large",
    500: "internal server error",
    501: "not implemented",
}

# Responders that are running: asyncio keeps only weak references to tasks, and an
# exchange whose client went away is referenced by nothing else.
_running: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request, read whole.

    Attributes:
        method: as sent, e.g. "POST".
        target: the path and query, as sent.
        headers: (name, value) pairs in the order sent, names lower-cased, values decoded
            as Latin-1 (each byte one character, whatever the client sent).
        body: the whole body, a chunked one decoded.
        client: the TCP peer's host.
    """

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    client: str


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """An answer. The exchange adds `Content-Length` (except to a 204 or 304, which have
    no body); to a HEAD request it sends the headers alone. A `Connection: close` header
    ends the connection after the answer.

    Raises:
        ValueError: a status outside 200-599, a body with a 204 or 304, or a
            `Content-Length` or `Transfer-Encoding` header (the exchange frames bodies).
    """

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"HTTP status {self.status} is not a final status (200-599)")
        if self.body and self.status in _BODILESS:
            raise ValueError(f"an HTTP {self.status} answer has no body")
        for name, _ in self.headers:
            if name.lower() in _FRAMING:
                raise ValueError(f"the {name} header is the exchange's to write")


Responder = Callable[[HttpRequest], Awaitable[HttpResponse]]


async def refuse(request: HttpRequest) -> HttpResponse:
    """The responder where nothing is served: 405, `Allow: GET` (a WebSocket handshake or
    `/healthz`, which never reach an exchange), and the connection closes."""
    return _error(http.HTTPStatus.METHOD_NOT_ALLOWED, ("allow", "GET"))


def _error(status: int, *headers: tuple[str, str], close: bool = True) -> HttpResponse:
    """`status` with `{"error": "<what it means>"}`; the connection closes after it unless
    told otherwise."""
    body = orjson.dumps({"error": _ERRORS[status]})
    closing = [("connection", "close")] if close else []
    return HttpResponse(status, body, [("content-type", "application/json"), *closing, *headers])


def _head(response: HttpResponse, *, close: bool = False) -> h11.Response:
    """The status line and headers of `response`, with `Connection: close` if `close`.

    Raises:
        h11.LocalProtocolError: a header name or value HTTP does not allow.
        UnicodeEncodeError: a header that is not ASCII.
    """
    headers = response.headers
    if response.status not in _BODILESS:
        headers = [*headers, ("content-length", str(len(response.body)))]
    if close:
        headers = [*headers, ("connection", "close")]
    try:
        reason = http.HTTPStatus(response.status).phrase
    except ValueError:  # a status with no registered phrase: the phrase is optional
        reason = ""
    return h11.Response(status_code=response.status, headers=headers, reason=reason)


class Exchanges:
    """A worker's plain HTTP connections, so that a stop ends each well (see the module
    docstring)."""

    def __init__(self) -> None:
        self.live: set[Exchange] = set()
        """Those open and not closing: a request may still come or be answered."""
        self.closing = False
        self._empty: asyncio.Event | None = None

    def add(self, served: Exchange) -> None:
        self.live.add(served)
        if self.closing:
            served.close_when_idle()

    def discard(self, served: Exchange) -> None:
        self.live.discard(served)
        if not self.live and self._empty is not None:
            self._empty.set()

    def close(self) -> None:
        """Close every connection between two requests now, and each other one once its
        request is answered; so too those that come from now on."""
        self.closing = True
        for served in list(self.live):
            served.close_when_idle()

    async def wait_answered(self) -> None:
        """Return once every connection is closing, its last answer written (after
        `close`)."""
        while self.live:
            self._empty = asyncio.Event()
            await self._empty.wait()


class Exchange(asyncio.Protocol):
    """One client connection served as plain HTTP/1.1.

    Args:
        responder: answers each request.
        exchanges: the worker's connections, which this one joins while it is open.
        max_head: bytes of a request line and its headers; 431 past it.
        max_body: bytes of a request body; 413 past it.
        request_timeout: seconds a request may take to arrive whole, from its first
            byte (from the connection's start for the first one); 408 then.
        idle_timeout: seconds to wait for the next request after an answer; the
            connection then closes.

    Raises:
        ValueError: a limit that is not positive.
    """

    __slots__ = (
        "_body",
        "_closing",
        "_head_only",
        "_idle",
        "_request",
        "_responding",
        "_size",
        "_timer",
        "client",
        "exchanges",
        "h11",
        "idle_timeout",
        "loop",
        "max_body",
        "max_head",
        "request_timeout",
        "responder",
        "transport",
    )

    def __init__(
        self,
        responder: Responder,
        exchanges: Exchanges,
        *,
        max_head: int = MAX_HEAD,
        max_body: int = MAX_BODY,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        limits = {"max_head": max_head, "max_body": max_body,
                  "request_timeout": request_timeout, "idle_timeout": idle_timeout}  # fmt: skip
        for name, value in limits.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        self.responder = responder
        self.exchanges = exchanges
        self.max_head = max_head
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client = ""
        """The TCP peer's host ("" when unknown)."""
        # h11 refuses a head still incomplete past this size; `_begin` a whole one.
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        # The request being read, its body so far and that body's size.
        self._request: h11.Request | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._head_only = False  # the request being answered is a HEAD
        self._responding = False
        # Waiting for a request to begin (the idle timeout runs), not for one to end.
        self._idle = False
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else ""
        self._idle = False
        self._wait(self.request_timeout)
        self.exchanges.add(self)

    def adopt(self, transport: asyncio.BaseTransport, data: bytes) -> None:
        """Take over a connection another protocol accepted, with the bytes it read (and
        counted) from it. The caller has made this exchange the transport's protocol."""
        self.connection_made(transport)
        self._receive(data)

    def data_received(self, data: bytes) -> None:
        counters.bytes_in += len(data)
        self._receive(data)

    def eof_received(self) -> bool | None:
        if not self._closing:
            # Reading stops while a request is answered, so this comes between requests
            # (the connection closes) or cuts one short (400, then it closes).
            self.h11.receive_data(b"")
            self._process()
        return None  # the transport closes once what was written is sent

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel()
        self.exchanges.discard(self)

    def close_when_idle(self) -> None:
        """Close now if no request is under way or arriving; otherwise once it is
        answered (`Connection: close`)."""
        if self._idle:  # between requests: none is arriving, none is being answered
            self._close()

    # Reading requests

    def _receive(self, data: bytes) -> None:
        if self._closing:
            return  # discarded: the connection is closing
        if self._idle:  # the next request begins: it has request_timeout to arrive whole
            self._idle = False
            self._wait(self.request_timeout)
        self.h11.receive_data(data)
        self._process()

    def _process(self) -> None:
        """Handle what h11 makes of the bytes received so far, up to a whole request."""
        conn = self.h11
        while not self._responding and not self._closing and self.transport is not None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                logger.debug("refusing an HTTP request from %s: %s", self.client, exc)
                hint = exc.error_status_hint
                self._refuse(hint if hint in _ERRORS else http.HTTPStatus.BAD_REQUEST)
                return
            if event is h11.NEED_DATA:
                return
            kind = type(event)
            if kind is h11.Data:
                data = cast(h11.Data, event).data
                self._size += len(data)
                if self._size > self.max_body:
                    self._refuse(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                    return
                self._body.append(data)
            elif kind is h11.Request:
                self._begin(cast(h11.Request, event))
            elif kind is h11.EndOfMessage:
                self._respond()
                return
            else:  # ConnectionClosed: the client is done (PAUSED cannot come: see _reply)
                self._close()
                return

    def _begin(self, request: h11.Request) -> None:
        """A request's head arrived: refuse it now if it is too large, or invite its body."""
        self._head_only = request.method == b"HEAD"
        head = len(request.method) + len(request.target)
        head += sum(len(name) + len(value) for name, value in request.headers)
        if head > self.max_head:
            self._refuse(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            return
        for name, value in request.headers:
            # h11 checked that it is digits, and that there is one.
            if name == b"content-length" and int(value) > self.max_body:
                self._refuse(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                return
        if request.method == b"CONNECT":
            self._refuse(http.HTTPStatus.METHOD_NOT_ALLOWED)
            return
        self._request = request
        self._body = []
        self._size = 0
        if self.h11.they_are_waiting_for_100_continue:
            proceed = h11.InformationalResponse(status_code=100, headers=[], reason="Continue")
            self._write(self.h11.send(proceed))

    # Answering

    def _respond(self) -> None:
        """The request is whole: stop reading, and run the responder on it."""
        request = self._request
        assert request is not None
        assert self.transport is not None
        body = b"".join(self._body)
        self._request = None
        self._body = []
        self._cancel()
        self._responding = True
        self.transport.pause_reading()
        whole = HttpRequest(
            request.method.decode("ascii"),  # h11 allows only ASCII in both
            request.target.decode("ascii"),
            [(name.decode("ascii"), value.decode("latin-1")) for name, value in request.headers],
            body,
            self.client,
        )
        task = self.loop.create_task(self._answer(whole))
        _running.add(task)
        task.add_done_callback(_running.discard)

    async def _answer(self, request: HttpRequest) -> None:
        try:
            response = await self.responder(request)
            # The worker stops: this is the connection's last answer.
            head = _head(response, close=self.exchanges.closing)
        except Exception:
            # Never the query: it may carry credentials.
            path = request.target.partition("?")[0]
            logger.exception("answering %s %s failed", request.method, path)
            response = _error(http.HTTPStatus.INTERNAL_SERVER_ERROR, close=False)
            head = _head(response, close=self.exchanges.closing)
        self._responding = False
        if self.transport is None or self._closing:
            return  # the client went away meanwhile: nobody to answer
        self._reply(response, head)

    def _reply(self, response: HttpResponse, head: h11.Response) -> None:
        """Write the answer, then go on with the next request or close."""
        conn = self.h11
        counters.answered(response.status)
        data = conn.send(head)
        if response.body and not self._head_only:
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        self._write(data)
        # Either side said Connection: close, or the client speaks HTTP/1.0: h11 wants
        # the connection closed.
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            self._close()
            return
        conn.start_next_cycle()
        self._head_only = False
        transport = self.transport
        assert transport is not None
        self._idle = not conn.trailing_data[0]  # or part of a pipelined request is here
        self._wait(self.idle_timeout if self._idle else self.request_timeout)
        transport.resume_reading()
        self._process()

    def _refuse(self, status: int) -> None:
        """Answer `status` (the exchange's own error) and close, reading no further."""
        conn = self.h11
        if conn.our_state is h11.IDLE or conn.our_state is h11.SEND_RESPONSE:
            counters.answered(status)
            response = _error(status)
            data = conn.send(_head(response))
            if not self._head_only:
                data += conn.send(h11.Data(data=response.body))
            self._write(data + conn.send(h11.EndOfMessage()))
        self._close()

    def _write(self, data: bytes) -> None:
        """Write `data`, unless the client is gone."""
        counters.bytes_out += len(data)
        transport = self.transport
        if transport is not None:
            # uvloop raises RuntimeError on a transport the peer reset in this turn of
            # the loop; `connection_lost` comes next.
            with contextlib.suppress(RuntimeError):
                transport.write(data)

    # Ending

    def _close(self) -> None:
        """End the connection once what was written is sent: send the end of stream, then
        read and discard what the client sends until it closes, `_LINGER` seconds at
        most; where the transport cannot send an end of stream alone (TLS), it closes at
        once. Nothing more is read as requests."""
        transport = self.transport
        if transport is None or self._closing:
            return
        self._closing = True
        self._cancel()
        self.exchanges.discard(self)
        if not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except (OSError, RuntimeError):  # uvloop raises RuntimeError if closing
            transport.abort()
            return
        transport.resume_reading()
        self._timer = self.loop.call_later(_LINGER, transport.abort)

    def _wait(self, delay: float) -> None:
        """(Re)start the timer: `_expired` in `delay` seconds."""
        self._cancel()
        self._timer = self.loop.call_later(delay, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        """No request came (close), or one did not arrive whole in time (408)."""
        self._timer = None
        if self._idle:
            logger.debug("closing an idle HTTP connection from %s", self.client)
            self._close()
        else:
            logger.debug("an HTTP request from %s timed out", self.client)
            self._refuse(http.HTTPStatus.REQUEST_TIMEOUT)


__all__ = ["Exchange", "Exchanges", "HttpRequest", "HttpResponse", "Responder", "refuse"]
