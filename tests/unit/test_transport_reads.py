"""The worker's connection protocol gets the same messages however the bytes are cut into
reads, with its fast path for whole messages on (the request alone in the first read,
as clients send it) or off (anything after the request in that read).

The protocol is driven through `data_received` with a recording transport: only that
controls where one read ends and the next begins, which the kernel decides for real
sockets (tests/e2e/test_transport.py and the Autobahn suite run real sockets).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.uri import parse_uri

from shoal.workers import transport
from shoal.workers.exchange import Exchanges, Responder

MAX_SIZE = 100_000


class Recorder:
    """The worker's side: records messages, accepts every handshake."""

    def __init__(self) -> None:
        self.messages: list[str | bytes] = []
        self.gone = False
        self.exchanges = Exchanges()

    def made(self, ws: transport.WebSocket) -> None:
        pass

    def responder(self, ws: transport.WebSocket) -> Responder | None:
        raise AssertionError("every connection here is a WebSocket")

    def route(self, ws: transport.WebSocket, request: Request) -> Response | None:
        return None

    def opened(self, ws: transport.WebSocket, request: Request) -> None:
        pass

    def received(self, ws: transport.WebSocket, data: str | bytes) -> None:
        self.messages.append(data)

    def lost(self, ws: transport.WebSocket) -> None:
        self.gone = True

    def overflowed(self, ws: transport.WebSocket) -> None:
        raise AssertionError("nothing is written here")


class Wire:
    """A transport that keeps what the protocol writes."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.writes = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data
        self.writes += 1

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def connect(*, fast: bool) -> tuple[transport.WebSocket, Recorder, Wire, ClientProtocol, bytes]:
    """A server connection after its handshake, and the client protocol talking to it.

    Returns the request bytes and, with `fast=False`, feeds them with the first byte of a
    frame after them (as a client that does not wait for the 101 might), so the fast path
    stays off; that byte is the fifth value, for the caller to continue the stream with.
    """
    recorder, wire = Recorder(), Wire()
    settings = transport.Settings.make(MAX_SIZE, 1 << 20, 10.0, 10.0, compression=False)
    ws = transport.WebSocket(recorder, settings)
    ws.connection_made(wire)  # type: ignore[arg-type]
    client = ClientProtocol(parse_uri("ws://shoal/ws"))
    client.send_request(client.connect())
    request = b"".join(client.data_to_send())
    first = Frame(Opcode.TEXT, b"opening").serialize(mask=True)
    if fast:
        ws.data_received(request)
        rest = first
    else:
        ws.data_received(request + first[:1])
        rest = first[1:]
    client.receive_data(bytes(wire.written))
    assert type(client.events_received()[0]) is Response
    del wire.written[:]
    assert ws.is_open
    return ws, recorder, wire, client, rest


def stream(
    client: ClientProtocol, rng: random.Random
) -> tuple[bytes, list[str | bytes], list[bytes]]:
    """Every kind of client frame, mixed: the bytes, the messages and the pings."""
    chunks: list[bytes] = []
    expected: list[str | bytes] = []
    pings: list[bytes] = []
    for n in range(60):
        kind = rng.choice(["text", "text", "binary", "fragmented", "ping", "big"])
        if kind == "text":
            client.send_text(f'{{"n":{n},"é":"ü"}}'.encode())
            expected.append(f'{{"n":{n},"é":"ü"}}')
        elif kind == "binary":
            data = rng.randbytes(rng.choice([0, 1, 125, 126, 300]))
            client.send_binary(data)
            expected.append(data)
        elif kind == "fragmented":
            client.send_text(b"frag", fin=False)
            client.send_ping(b"between")
            pings.append(b"between")
            client.send_continuation("ment é".encode(), fin=True)
            expected.append("fragment é")
        elif kind == "ping":
            client.send_ping(str(n).encode())
            pings.append(str(n).encode())
        else:
            data = rng.randbytes(70_000)
            client.send_binary(data)
            expected.append(data)
        chunks.append(b"".join(client.data_to_send()))
    return b"".join(chunks), expected, pings


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("seed", range(8))
async def test_the_same_messages_however_the_bytes_are_cut(fast: bool, seed: int) -> None:
    rng = random.Random(seed)
    ws, recorder, wire, client, rest = connect(fast=fast)
    assert ws._fast is fast
    data, expected, pings = stream(client, rng)
    data = rest + data
    at = 0
    while at < len(data):  # reads of 1 byte to 3 frames' worth, and one per frame header
        size = rng.choice([1, 2, 3, 7, 50, 500, 5000, 100_000])
        ws.data_received(data[at : at + size])
        at += size
    assert recorder.messages == ["opening", *expected]
    assert ws.is_open and not wire.closed
    # Every ping got its pong, in order, from the server.
    client.receive_data(bytes(wire.written))
    pongs = [f.data for f in client.events_received() if type(f) is Frame]
    assert pongs == pings


def close_code_sent(wire: Wire, client: ClientProtocol) -> int | None:
    """The code of the close frame the server wrote, as the client reads it."""
    client.receive_data(bytes(wire.written))
    client.events_received()
    return client.close_rcvd.code if client.close_rcvd is not None else None


@pytest.mark.parametrize("fast", [True, False])
async def test_a_bad_frame_after_good_ones_fails_the_connection_after_them(fast: bool) -> None:
    ws, recorder, wire, client, rest = connect(fast=fast)
    client.send_text(b"good")
    good = b"".join(client.data_to_send())
    unmasked = Frame(Opcode.TEXT, b"bad").serialize(mask=False)
    ws.data_received(rest + good + unmasked + good)
    assert recorder.messages == ["opening", "good"]
    assert close_code_sent(wire, client) == 1002


@pytest.mark.parametrize("fast", [True, False])
async def test_invalid_utf8_stops_delivery_at_that_message(fast: bool) -> None:
    ws, recorder, wire, client, rest = connect(fast=fast)
    client.send_text(b"one")
    client.send_text(b"\xff\xfe")
    client.send_text(b"after")
    ws.data_received(rest + b"".join(client.data_to_send()))
    assert recorder.messages == ["opening", "one"]
    assert close_code_sent(wire, client) == 1007


@pytest.mark.parametrize("fast", [True, False])
async def test_a_message_over_max_size_is_refused_with_1009(fast: bool) -> None:
    ws, recorder, wire, client, rest = connect(fast=fast)
    client.send_binary(b"x" * (MAX_SIZE + 1))
    data = rest + b"".join(client.data_to_send())
    for at in range(0, len(data), 4096):
        ws.data_received(data[at : at + 4096])
    assert recorder.messages == ["opening"]
    assert close_code_sent(wire, client) == 1009


@pytest.mark.parametrize("fast", [True, False])
async def test_a_frame_inside_a_payload_is_never_taken_for_a_frame(fast: bool) -> None:
    """A binary message whose payload is itself a client frame (a zero mask key keeps it
    readable on the wire), its header and payload arriving in separate reads."""
    ws, recorder, _, _, rest = connect(fast=fast)
    inner = Frame(Opcode.TEXT, b"inner").serialize(mask=True)
    outer = bytes([0x82, 0x80 | len(inner)]) + b"\x00\x00\x00\x00" + inner
    ws.data_received(rest)
    for cut in (2, 6):  # after the header, after the mask key
        ws.data_received(outer[:cut])
        ws.data_received(outer[cut:])
    assert recorder.messages == ["opening", inner, inner]


async def test_an_open_connection_keeps_no_handshake_headers() -> None:
    """websockets' parser holds the request for the connection's life: its headers, a
    dozen objects and a kilobyte from a browser, are emptied once the worker has them."""
    seen: list[Request] = []
    recorder, wire = Recorder(), Wire()
    recorder.opened = lambda ws, request: seen.append(request)  # type: ignore[method-assign]
    settings = transport.Settings.make(MAX_SIZE, 1 << 20, 10.0, 10.0, compression=False)
    ws = transport.WebSocket(recorder, settings)
    ws.connection_made(wire)  # type: ignore[arg-type]
    client = ClientProtocol(parse_uri("ws://shoal/ws?user_id=ann"))
    client.send_request(client.connect())
    ws.data_received(b"".join(client.data_to_send()))
    assert ws.is_open
    [request] = seen
    assert request.path == "/ws?user_id=ann"
    assert len(request.headers) == 0


async def test_a_corked_connection_sends_its_101_with_what_follows_in_one_write() -> None:
    """The worker corks a connection until it is registered: the 101 and the welcome
    leave together, then writes go straight out again."""
    recorder, wire = Recorder(), Wire()
    settings = transport.Settings.make(MAX_SIZE, 1 << 20, 10.0, 10.0, compression=False)
    ws = transport.WebSocket(recorder, settings)
    recorder.opened = lambda ws, request: ws.cork()  # type: ignore[method-assign]
    ws.connection_made(wire)  # type: ignore[arg-type]
    client = ClientProtocol(parse_uri("ws://shoal/ws"))
    client.send_request(client.connect())
    ws.data_received(b"".join(client.data_to_send()))
    assert ws.is_open and wire.writes == 0  # the 101 is held
    ws.write(b"\x81\x07welcome")
    ws.uncork()
    assert wire.writes == 1
    ws.write(b"\x81\x05later")
    assert wire.writes == 2
    client.receive_data(bytes(wire.written))
    events = client.events_received()
    assert type(events[0]) is Response and events[0].status_code == 101
    assert [f.data for f in events[1:] if type(f) is Frame] == [b"welcome", b"later"]
