"""Plain HTTP/1.1 on the WebSocket port (`shoal.workers.exchange`): a first read that
cannot begin a handshake makes the connection an HTTP exchange, served with h11.

A real uvloop server of `transport.factory` runs in a thread of its own, so that the
clients, plain sockets, `http.client` and curl (independent of h11), may block.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import http.client
import json
import logging
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import trustme
import uvloop
from websockets.http11 import Request, Response
from websockets.sync.client import connect

from shoal.core.metrics import counters
from shoal.workers import transport
from shoal.workers.exchange import Exchange, Exchanges, HttpRequest, HttpResponse, Responder

from support import SCALE, upgrade_request, wait_until

SETTINGS = transport.Settings.make(1 << 20, 1 << 20, 10.0, 3.0, compression=False)
PROBE = b"POST /probe HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"


class Doorman:
    """The worker's side: a responder for plain HTTP, an echo for WebSockets, and the
    bookkeeping of handshakes under way that `shoal.workers.sessions` keeps."""

    def __init__(self, responder: Responder | None) -> None:
        self.http = responder
        self.made_count = 0
        self.handshaking: set[transport.WebSocket] = set()
        self.exchanges = Exchanges()

    def made(self, ws: transport.WebSocket) -> None:
        self.made_count += 1
        self.handshaking.add(ws)

    def responder(self, ws: transport.WebSocket) -> Responder | None:
        return self.http

    def route(self, ws: transport.WebSocket, request: Request) -> Response | None:
        return None

    def opened(self, ws: transport.WebSocket, request: Request) -> None:
        self.handshaking.discard(ws)

    def received(self, ws: transport.WebSocket, data: str | bytes) -> None:
        text = type(data) is str
        ws.send(data.encode() if isinstance(data, str) else data, text=text)

    def lost(self, ws: transport.WebSocket) -> None:
        self.handshaking.discard(ws)

    def overflowed(self, ws: transport.WebSocket) -> None:
        raise AssertionError("nothing here writes that much")


class Server:
    """`transport.factory` on uvloop, on a free port, in a thread of its own."""

    def __init__(
        self,
        responder: Responder | None,
        settings: transport.Settings,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.requests: list[HttpRequest] = []
        self.doorman = Doorman(None if responder is None else self._recorded(responder))
        self.loop = uvloop.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(settings, tls, ready))
        self.thread.start()
        assert ready.wait(10 * SCALE)

    def _recorded(self, responder: Responder) -> Responder:
        async def record(request: HttpRequest) -> HttpResponse:
            self.requests.append(request)
            return await responder(request)

        return record

    def _run(
        self, settings: transport.Settings, tls: ssl.SSLContext | None, ready: threading.Event
    ) -> None:
        asyncio.set_event_loop(self.loop)
        factory = transport.factory(self.doorman, settings)
        listening = self.loop.create_server(factory, "127.0.0.1", 0, ssl=tls)
        self.server = cast(asyncio.Server, self.loop.run_until_complete(listening))
        self.port = int(self.server.sockets[0].getsockname()[1])
        ready.set()
        self.loop.run_forever()
        self.server.close()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5 * SCALE)

    def call(self, function: Callable[[], Any]) -> None:
        """Run `function` in the server's loop."""
        self.loop.call_soon_threadsafe(function)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10 * SCALE)


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(
        responder: Responder | None = echo, tls: ssl.SSLContext | None = None, **settings: Any
    ) -> Server:
        """A server with `transport.Settings` fields changed by `settings`."""
        server = Server(responder, dataclasses.replace(SETTINGS, **settings), tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


async def echo(request: HttpRequest) -> HttpResponse:
    """The request's body back, its method and target in headers."""
    headers = [("x-method", request.method), ("x-target", request.target)]
    return HttpResponse(200, request.body, headers)


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read `count` responses framed by Content-Length (100 Continue included as one):
    (status, headers with lower-cased names, body) each."""
    data = b""
    answers: list[tuple[int, dict[str, str], bytes]] = []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            lines = data[:end].decode("latin-1").split("\r\n")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, value = line.split(": ", 1)
                headers[name.lower()] = value
            length = int(headers.get("content-length", "0"))
            if len(data) >= end + 4 + length:
                body = data[end + 4 : end + 4 + length]
                answers.append((int(lines[0].split(" ")[1]), headers, body))
                data = data[end + 4 + length :]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {len(answers)} answers"
        data += chunk
    assert not data, data
    return answers


def closed(sock: socket.socket) -> bool:
    """Whether the server ended the connection, with nothing more sent."""
    return sock.recv(65536) == b""


def test_a_post_reaches_the_responder_whole_and_the_handshake_count_stays_right(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    body = bytes(range(256)) * 64 + b"\r\n\r\n0\r\n"
    head = (
        b"POST /apps/1/events?auth_key=k&x=%20y HTTP/1.1\r\nHost: shoal\r\n"
        b"Content-Type: application/json\r\nX-Note: cr\xe8me\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with server.connect() as sock:
        # Something waits for the connection to be gone, as a stopping worker does.
        (ws,) = wait_until(lambda: [*server.doorman.handshaking], 5, "the connection")
        waiting = threading.Event()

        async def wait_closed() -> None:
            waiting.set()  # in the same step as wait_closed() begins, before any read
            await ws.wait_closed()

        gone = asyncio.run_coroutine_threadsafe(wait_closed(), server.loop)
        assert waiting.wait(5 * SCALE)
        sock.sendall(head + body)
        ((status, headers, answer),) = read_responses(sock, 1)
        assert status == 200 and answer == body
        assert headers["x-method"] == "POST" and headers["content-length"] == str(len(body))
        # Served, kept open, and gone for the worker: no longer a handshake under way,
        # and what waited for it returned.
        assert not server.doorman.handshaking
        gone.result(5 * SCALE)
    assert server.requests == [
        HttpRequest(
            "POST",
            "/apps/1/events?auth_key=k&x=%20y",
            [
                ("host", "shoal"),
                ("content-type", "application/json"),
                ("x-note", "cr\xe8me"),
                ("content-length", str(len(body))),
            ],
            body,
            "127.0.0.1",
        )
    ]


def test_keep_alive_serves_requests_in_turn_on_one_connection(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5 * SCALE)
    try:
        conn.request("POST", "/one", body=b"first")
        first = conn.getresponse()
        assert (first.status, first.read()) == (200, b"first")
        sock = conn.sock
        conn.request("HEAD", "/two", body=b"second")
        second = conn.getresponse()
        # HEAD: the length the body would have, and no body.
        assert second.status == 200 and second.getheader("Content-Length") == "6"
        assert second.read() == b""
        conn.request("PUT", "/three", body=b"third")
        third = conn.getresponse()
        assert (third.status, third.read()) == (200, b"third")
        assert conn.sock is sock
    finally:
        conn.close()
    assert [(r.method, r.target) for r in server.requests] == [
        ("POST", "/one"), ("HEAD", "/two"), ("PUT", "/three")
    ]  # fmt: skip
    assert server.doorman.made_count == 1


def test_pipelined_requests_are_answered_one_at_a_time_in_order(
    serve: Callable[..., Server],
) -> None:
    running: list[str] = []
    overlapped: list[str] = []

    async def slow_first(request: HttpRequest) -> HttpResponse:
        if running:
            overlapped.append(request.target)
        running.append(request.target)
        if request.target == "/1":
            await asyncio.sleep(0.2)  # the others are there, and must wait
        running.remove(request.target)
        return HttpResponse(200, request.target.encode())

    server = serve(slow_first)
    requests = b"".join(
        b"PATCH /" + str(n).encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n"
        + str(n).encode()
        for n in (1, 2, 3)
    )  # fmt: skip
    with server.connect() as sock:
        sock.sendall(requests + b"DELETE /4 HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = read_responses(sock, 4)
    assert [body for _, _, body in answers] == [b"/1", b"/2", b"/3", b"/4"]
    assert [r.body for r in server.requests] == [b"1", b"2", b"3", b""]
    assert not overlapped


def test_reading_stops_while_a_responder_runs(serve: Callable[..., Server]) -> None:
    """Pipelined bytes wait in the kernel's buffers, not in the worker's memory."""
    started = threading.Event()
    release = asyncio.Event()

    async def stuck(request: HttpRequest) -> HttpResponse:
        started.set()
        await release.wait()
        return HttpResponse(200)

    server = serve(stuck)
    with server.connect() as sock:
        sock.sendall(PROBE)
        assert started.wait(5 * SCALE)
        sock.settimeout(1 * SCALE)
        flood = (PROBE * 1000) * 1000  # 60 MB of requests: far more than the kernel buffers
        with pytest.raises(TimeoutError):
            sock.sendall(flood)
        server.call(release.set)
        sock.settimeout(5 * SCALE)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_stop_closes_idle_connections_and_answers_the_request_under_way_first(
    serve: Callable[..., Server],
) -> None:
    """`Exchanges.close()` (the worker stops): a connection between requests gets its end
    of stream at once; a request being answered gets its answer, with `Connection:
    close`, and only then the end of stream; `wait_answered` returns after that."""
    started = threading.Event()
    release = asyncio.Event()

    async def slow(request: HttpRequest) -> HttpResponse:
        if request.target == "/slow":
            started.set()
            await release.wait()
        return HttpResponse(200, b"done")

    server = serve(slow)
    exchanges = server.doorman.exchanges
    answered = threading.Event()

    async def stop() -> None:
        exchanges.close()
        await exchanges.wait_answered()
        answered.set()

    with server.connect() as idle, server.connect() as busy:
        idle.sendall(PROBE)
        ((status, headers, _),) = read_responses(idle, 1)
        assert status == 200 and "connection" not in headers  # kept alive
        busy.sendall(PROBE.replace(b"/probe", b"/slow"))
        assert started.wait(5 * SCALE)
        server.call(lambda: server.loop.create_task(stop()))
        assert closed(idle)
        assert not answered.wait(0.2 * SCALE)  # the slow request is still to be answered
        server.call(release.set)
        ((status, headers, body),) = read_responses(busy, 1)
        assert (status, headers["connection"], body) == (200, "close", b"done")
        assert closed(busy)
        assert answered.wait(5 * SCALE)


def test_expect_100_continue_is_answered_before_the_body_is_sent(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    with server.connect() as sock:
        sock.sendall(
            b"POST /big HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        ((status, _, body),) = read_responses(sock, 1)
        assert (status, body) == (100, b"")
        sock.sendall(b"hello")
        ((status, _, body),) = read_responses(sock, 1)
        assert (status, body) == (200, b"hello")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_gets_100_continue_and_reuses_the_connection(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve()
    payload = tmp_path / "payload"
    payload.write_bytes(bytes(range(256)) * 1000)
    url = f"http://127.0.0.1:{server.port}"
    done = subprocess.run(
        ["curl", "-sSv", "--expect100-timeout", str(30 * SCALE), "-H", "Expect: 100-continue",
         "--data-binary", f"@{payload}", f"{url}/a", f"{url}/b"],
        capture_output=True, timeout=30 * SCALE,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == payload.read_bytes() * 2
    assert done.stderr.count(b"< HTTP/1.1 100 Continue") == 2
    assert server.doorman.made_count == 1  # one connection, kept alive


def test_a_chunked_body_is_decoded(serve: Callable[..., Server]) -> None:
    server = serve()
    with server.connect() as sock:
        sock.sendall(
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n1;ext=1\r\n \r\na\r\n0123456789\r\n0\r\n\r\n"
        )
        ((status, _, body),) = read_responses(sock, 1)
    assert (status, body) == (200, b"hello 0123456789")


def test_an_oversized_body_is_refused_before_it_is_read(serve: Callable[..., Server]) -> None:
    server = serve(http_max_body=1000)
    announced = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
    # Announced: 413 at once, the body never sent; with Expect, no 100 Continue first.
    for expect in (b"", b"Expect: 100-continue\r\n"):
        with server.connect() as sock:
            sock.sendall(announced[:-2] + expect + b"\r\n")
            ((status, headers, body),) = read_responses(sock, 1)
            assert status == 413 and json.loads(body) == {"error": "payload too large"}
            assert headers["connection"] == "close" and closed(sock)
    # Already on its way: the answer still arrives whole (what follows is discarded, so
    # the connection ends without a reset).
    with server.connect() as sock:
        sock.sendall(announced + b"x" * 300_000)
        ((status, _, _),) = read_responses(sock, 1)
        assert status == 413 and closed(sock)
    # Chunked: refused once past the limit.
    with server.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"200\r\n" + b"y" * 512 + b"\r\n")
        sock.sendall(b"200\r\n" + b"y" * 512 + b"\r\n")
        ((status, _, _),) = read_responses(sock, 1)
        assert status == 413 and closed(sock)
    # At the limit: served.
    with server.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"z" * 1000)
        assert read_responses(sock, 1)[0][0] == 200
    assert [len(r.body) for r in server.requests] == [1000]


def test_an_oversized_head_gets_431(serve: Callable[..., Server]) -> None:
    server = serve(http_max_head=2048)
    big = b"X-Big: " + b"b" * 3000 + b"\r\n"
    before = counters.http_requests["431"]
    # Whole in one read, and still arriving past the limit.
    for request in (b"POST /x HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n",
                    b"POST /x HTTP/1.1\r\nHost: x\r\n" + big):  # fmt: skip
        with server.connect() as sock:
            sock.sendall(request)
            ((status, _, body),) = read_responses(sock, 1)
            assert status == 431 and closed(sock)
            assert json.loads(body) == {"error": "request header fields too large"}
    assert not server.requests
    assert counters.http_requests["431"] == before + 2  # the server counts in this process


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /x HTTP/1.1\r\nHost x\r\n\r\n", 400),  # a header without a colon
        (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"\x16\x03\x01 not http at all\r\n\r\n", 400),  # TLS on the plain port
        (b"\r\nGET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # a blank line first
        (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
)
def test_malformed_requests_are_refused_and_closed(
    serve: Callable[..., Server], request_bytes: bytes, status: int
) -> None:
    server = serve()
    with server.connect() as sock:
        sock.sendall(request_bytes)
        ((answer, headers, body),) = read_responses(sock, 1)
        assert answer == status and headers["connection"] == "close" and closed(sock)
        assert json.loads(body)["error"] in ("bad request", "not implemented")
    assert not server.requests


def test_connect_is_never_served(serve: Callable[..., Server]) -> None:
    server = serve()
    with server.connect() as sock:
        sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert read_responses(sock, 1)[0][0] == 405 and closed(sock)
    assert not server.requests


def test_a_request_that_does_not_arrive_in_time_gets_408(serve: Callable[..., Server]) -> None:
    timeout = 0.5 * SCALE
    server = serve(open_timeout=timeout)
    with server.connect() as sock:
        started = time.monotonic()
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        ((status, _, _),) = read_responses(sock, 1)
        assert status == 408 and closed(sock)
        assert time.monotonic() - started >= timeout * 0.9
    # A keep-alive connection's next request has as long, from its first byte.
    with server.connect() as sock:
        sock.sendall(PROBE)
        assert read_responses(sock, 1)[0][0] == 200
        sock.sendall(b"POST /x HTTP/1.1\r\n")
        started = time.monotonic()
        assert read_responses(sock, 1)[0][0] == 408 and closed(sock)
        assert time.monotonic() - started >= timeout * 0.9


def test_an_idle_keep_alive_connection_is_closed_without_an_answer(
    serve: Callable[..., Server],
) -> None:
    idle = 0.5 * SCALE
    server = serve(http_idle_timeout=idle)
    with server.connect() as sock:
        sock.sendall(PROBE)
        assert read_responses(sock, 1)[0][0] == 200
        answered = time.monotonic()
        assert closed(sock)
        assert time.monotonic() - answered >= idle * 0.9


def test_connection_close_and_a_half_closed_client_are_answered_then_closed(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    with server.connect() as sock:
        sock.sendall(PROBE.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
        ((status, headers, _),) = read_responses(sock, 1)
        assert status == 200 and headers["connection"] == "close" and closed(sock)
    with server.connect() as sock:
        sock.sendall(PROBE)
        sock.shutdown(socket.SHUT_WR)
        assert read_responses(sock, 1)[0][0] == 200 and closed(sock)


def test_a_responder_that_raises_gets_500_and_the_connection_goes_on(
    serve: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    async def fragile(request: HttpRequest) -> HttpResponse:
        if request.target.startswith("/boom"):
            raise RuntimeError("the responder broke")
        if request.target == "/bad-header":
            return HttpResponse(200, b"", [("x-bad", "line\r\nbreak")])
        return HttpResponse(200, b"fine")

    server = serve(fragile)
    with server.connect() as sock:
        sock.sendall(b"POST /boom?auth_signature=s3cret HTTP/1.1\r\nHost: x\r\n\r\n")
        ((status, headers, body),) = read_responses(sock, 1)
        assert status == 500 and json.loads(body) == {"error": "internal server error"}
        assert "connection" not in headers
        sock.sendall(b"POST /bad-header HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(sock, 1)[0][0] == 500
        sock.sendall(b"POST /fine HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(sock, 1)[0][2] == b"fine"
    failures = [r for r in caplog.records if r.name == "shoal.workers.exchange"]
    assert [r.getMessage() for r in failures] == [
        "answering POST /boom failed", "answering POST /bad-header failed"
    ]  # fmt: skip
    assert all(r.levelno == logging.ERROR and r.exc_info for r in failures)
    assert "s3cret" not in caplog.text


def test_a_client_that_leaves_while_its_request_is_answered_breaks_nothing(
    serve: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    started = threading.Event()
    finished = threading.Event()
    release = asyncio.Event()

    async def slow(request: HttpRequest) -> HttpResponse:
        started.set()
        await release.wait()
        finished.set()
        return HttpResponse(200, b"x" * 100_000)

    server = serve(slow)
    with server.connect() as sock:
        sock.sendall(PROBE)
        assert started.wait(5 * SCALE)
        # Gone with a reset, as a client that crashed.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.call(release.set)
    assert finished.wait(5 * SCALE)

    def collected() -> bool:
        gc.collect()
        alive = (Exchange, transport.WebSocket)
        return not any(
            isinstance(thing, alive) and thing.loop is server.loop for thing in gc.get_objects()
        )

    wait_until(collected, 5, "the exchange and its WebSocket to be collected")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # The server serves on.
    with server.connect() as sock:
        sock.sendall(PROBE)
        assert read_responses(sock, 1)[0][2] == b"x" * 100_000


def test_a_responder_waiting_on_what_nothing_else_holds_is_not_collected(
    serve: Callable[..., Server],
) -> None:
    """asyncio keeps only weak references to tasks: the exchange must keep its own."""
    waits: list[weakref.ref[asyncio.Future[None]]] = []

    async def lonely(request: HttpRequest) -> HttpResponse:
        alone = asyncio.get_running_loop().create_future()
        waits.append(weakref.ref(alone))
        await alone
        return HttpResponse(200, b"still here")

    server = serve(lonely)
    with server.connect() as sock:
        sock.sendall(PROBE)
        wait_until(lambda: waits, 5, "the responder to wait")
        gc.collect()

        def release() -> None:
            alone = waits[0]()
            if alone is not None:
                alone.set_result(None)

        server.call(release)
        assert read_responses(sock, 1)[0][2] == b"still here"


def test_without_a_responder_every_request_gets_405_and_the_connection_closes(
    serve: Callable[..., Server],
) -> None:
    server = serve(None)
    with server.connect() as sock:
        sock.sendall(PROBE + PROBE)
        ((status, headers, body),) = read_responses(sock, 1)
        assert status == 405 and headers["allow"] == "GET"
        assert json.loads(body) == {"error": "method not allowed"}
        assert closed(sock)


def test_websocket_handshakes_still_go_to_websockets(serve: Callable[..., Server]) -> None:
    server = serve()
    with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
        ws.send("hello")
        assert ws.recv(timeout=5 * SCALE) == "hello"
    # A GET split after its first byte is still a handshake.
    with server.connect() as sock:
        request = upgrade_request("/ws")
        sock.sendall(request[:1])

        def read() -> bool:  # websockets' parser holds the first byte
            return any(ws.protocol.reader.buffer == b"G" for ws in [*server.doorman.handshaking])

        wait_until(read, 5, "the first byte to be read alone")
        sock.sendall(request[1:])
        assert sock.recv(65536).startswith(b"HTTP/1.1 101")
    assert not server.requests


def test_plain_http_over_tls(
    serve: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(tls)
    client = ssl.create_default_context()
    authority.configure_trust(client)
    server = serve(tls=tls)
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=5 * SCALE,
                                       context=client)  # fmt: skip
    try:
        for body in (b"over", b"tls"):
            conn.request("POST", "/s", body=body)
            answer = conn.getresponse()
            assert (answer.status, answer.read()) == (200, body)
    finally:
        conn.close()
    with connect(f"wss://127.0.0.1:{server.port}/ws", ssl=client) as ws:
        ws.send("secure")
        assert ws.recv(timeout=5 * SCALE) == "secure"
    # Refused, then closed at once: TLS has no end of stream without the close.
    raw = server.connect()
    with client.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999\r\n\r\n")
        ((status, _, _),) = read_responses(sock, 1)
        assert status == 413 and closed(sock)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
