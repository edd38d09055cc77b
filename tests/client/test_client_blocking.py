"""`shoal.client.Client` against a live two-worker server (and, for what shoal never
does, small real servers of the test's own): every call and every error."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.sync.server import ServerConnection, serve

from shoal.client import (
    AuthenticationFailed,
    Client,
    ConnectFailed,
    ConnectionClosed,
    ErrorReply,
    HandshakeRefused,
    ProtocolError,
    TaskFailed,
    TimedOut,
)
from shoal.core import schema

from support import SCALE, Shoal, free_port

Sign = Callable[..., str]

T = 10 * SCALE  # the timeout of every call that should succeed


def url(node: Shoal, query: str = "") -> str:
    return f"ws://127.0.0.1:{node.port}/ws{query}"


def test_send_text_json_and_binary_and_receive_each(chat: Shoal) -> None:
    with Client(url(chat), timeout=T) as c:
        welcome = c.receive_json()
        assert welcome["type"] == "welcome" and c.last_opcode == "text"
        schema.check_server_message(welcome)
        c.send({"type": "join_room", "room": "lobby"})  # a dict goes as JSON text
        assert c.receive_json()["type"] == "joined_room"
        c.send('{"type":"room_message","room":"lobby","message":"hi"}')  # str as it is
        echoed = json.loads(c.receive())
        assert (echoed["type"], echoed["message"]) == ("room_message", "hi")
        c.send(b"\x00\x01binary\xff")  # bytes as a binary frame; the chat app echoes it
        assert (c.receive(), c.last_opcode) == (b"\x00\x01binary\xff", "binary")
        c.send(["a", "list"])  # a list is JSON text too: not an object, so refused
        assert c.receive_json() == {"type": "error", "message": "Invalid message format"}
        with pytest.raises(TypeError):
            c.send(42)
        assert c.ping() >= 0  # still open after the refusal


def test_receive_times_out_and_the_connection_stays_usable(chat: Shoal) -> None:
    with Client(url(chat), timeout=T) as c:
        c.receive_json()  # welcome
        started = time.monotonic()
        with pytest.raises(TimedOut) as caught:
            c.receive(timeout=0.3)
        waited = time.monotonic() - started
        assert isinstance(caught.value, TimeoutError)
        assert 0.3 <= waited < 0.3 + 2 * SCALE
        c.send({"type": "ping"})
        assert c.receive_json() == {"type": "echo", "data": {"type": "ping"}}


def test_receive_json_refuses_binary_with_a_protocol_error(chat: Shoal) -> None:
    with Client(url(chat), timeout=T) as c:
        c.receive_json()
        c.send(b"\x01\x02")
        with pytest.raises(ProtocolError, match="binary"):
            c.receive_json()
        c.send({"type": "ping"})  # the bad message was consumed; the next one is fine
        assert c.receive_json()["type"] == "echo"


def test_close_with_a_code_and_then_every_call_says_closed(chat: Shoal) -> None:
    c = Client(url(chat), timeout=T)
    c.receive_json()
    c.close(4321, "bye now")
    assert c.close_code == 4321 and c.close_reason == "bye now"
    with pytest.raises(ConnectionClosed) as caught:
        c.send({"type": "ping"})
    assert caught.value.code == 4321
    with pytest.raises(ConnectionClosed):
        c.receive(timeout=1)
    c.close()  # closing again does nothing


def test_a_kick_ends_receive_with_the_close_code_reason_and_advice(chat: Shoal, sign: Sign) -> None:
    with (
        Client(url(chat), timeout=T, token=sign("mod", "moderator")) as mod,
        Client(url(chat), timeout=T, token=sign("target")) as target,
    ):
        assert mod.receive_json()["type"] == "authenticated"
        assert target.receive_json()["user_id"] == "target"
        reply = mod.request({"type": "kick_user", "user_id": "target"}, "user_kicked")
        assert reply["connections"] == 1
        assert target.receive_json()["type"] == "kicked"
        with pytest.raises(ConnectionClosed) as caught:
            target.receive()
    closed = caught.value
    assert (closed.code, closed.reason) == (4003, "kicked")
    assert closed.advice.reconnect is schema.Reconnect.NEVER


def test_request_returns_the_reply_and_keeps_what_came_before_it(chat: Shoal) -> None:
    with Client(url(chat), timeout=T) as ann, Client(url(chat), timeout=T) as bo:
        ann_id = ann.receive_json()["user_id"]
        bo_id = bo.receive_json()["user_id"]
        bo.request({"type": "join_room", "room": "r"}, "joined_room")
        ann.request({"type": "join_room", "room": "r"}, "joined_room")
        assert bo.receive_json()["type"] == "user_joined_room"
        bo.send({"type": "room_message", "room": "r", "message": "first"})
        assert bo.receive_json()["message"] == "first"  # its own copy
        # ann's request reads bo's room message before its reply: it is kept, in order.
        presence = ann.request({"type": "presence", "room": "r"}, "presence")
        assert [u["user_id"] for u in presence["users"]] == sorted([ann_id, bo_id])
        kept = ann.receive_json()
        assert (kept["type"], kept["message"]) == ("room_message", "first")
        with pytest.raises(ErrorReply) as caught:
            ann.request({"type": "join_room"}, "joined_room")
        assert caught.value.message == "Missing room"
        with pytest.raises(TimedOut):
            ann.request({"type": "ping"}, "never_sent_type", timeout=0.3)


def test_request_waits_for_the_task_result_with_its_own_id(chat: Shoal) -> None:
    with Client(url(chat), timeout=30 * SCALE) as c:
        c.receive_json()
        slow = {"type": "task", "task": "process_data", "data": {"numbers": [5, 1, 3]}}
        c.send(slow)  # dispatched first: its result must not be taken for the next one's
        result = c.request(
            {"type": "task", "task": "process_data", "data": {"numbers": [1, 2, 3, 4]}},
            "task_result",
        )
        assert result["result"]["sum"] == 10
        others = [c.receive_json(), c.receive_json()]
        assert [m["type"] for m in others] == ["task_dispatched", "task_result"]
        assert others[1]["task_id"] == others[0]["task_id"] != result["task_id"]
        assert others[1]["result"]["sum"] == 9
        with pytest.raises(TaskFailed) as caught:
            c.request(
                {"type": "task", "task": "process_data", "data": {"numbers": "nope"}},
                "task_result",
            )
        assert caught.value.task_id and caught.value.type


def test_a_token_and_an_unwanted_token(chat: Shoal, sign: Sign) -> None:
    with Client(url(chat), timeout=T, token=sign("tokened", "admin")) as c:
        first = c.receive_json()
    assert (first["type"], first["user_id"], first["role"]) == ("authenticated", "tokened", "admin")
    with pytest.raises(AuthenticationFailed) as caught:
        Client(url(chat), timeout=T, token="not.a.token")
    refused = caught.value
    assert (refused.status, refused.reason) == (401, "malformed token")
    assert isinstance(refused, HandshakeRefused | ConnectFailed)


def test_a_refused_path_and_a_closed_port_cannot_connect(chat: Shoal) -> None:
    with pytest.raises(HandshakeRefused) as caught:
        Client(f"ws://127.0.0.1:{chat.port}/nowhere", timeout=T)
    assert caught.value.status == 404
    port = free_port()
    with pytest.raises(ConnectFailed) as refused:
        Client(f"ws://127.0.0.1:{port}/ws", timeout=T)
    assert isinstance(refused.value.__cause__, ConnectionRefusedError)
    with pytest.raises(ValueError, match="not a WebSocket URL"):
        Client(f"http://127.0.0.1:{port}/ws")


def test_a_server_that_never_answers_the_handshake_times_out() -> None:
    with socket.socket() as listener:  # listens, never accepts: the kernel completes TCP
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConnectFailed, match="handshake within the timeout"):
            Client(f"ws://127.0.0.1:{port}/ws", timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 0.5 + 2 * SCALE


@contextlib.contextmanager
def echo_handshake_server() -> Iterator[int]:
    """A websockets server that answers each connection with the request's headers and
    the subprotocol it selected (shoal has no way to show a client its own headers)."""

    def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        headers = {k.lower(): v for k, v in ws.request.headers.raw_items()}
        ws.send(json.dumps({"headers": headers, "subprotocol": ws.subprotocol}))

    with serve(handler, "127.0.0.1", 0, subprotocols=["shoal"]) as server:  # type: ignore[list-item]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.socket.getsockname()[1]
        finally:
            server.shutdown()
            thread.join(5)


def test_custom_headers_subprotocols_and_the_token_header_reach_the_server() -> None:
    with echo_handshake_server() as port:
        headers = {"X-Trace": "abc-123", "Origin": "https://chat.example"}
        with Client(
            f"ws://127.0.0.1:{port}/", timeout=T, headers=headers,
            subprotocols=["v2.other", "shoal"], token="tok",
        ) as c:  # fmt: skip
            seen: dict[str, Any] = c.receive_json()
            assert c.subprotocol == "shoal"
    assert seen["subprotocol"] == "shoal"
    assert seen["headers"]["x-trace"] == "abc-123"
    assert seen["headers"]["origin"] == "https://chat.example"
    assert seen["headers"]["authorization"] == "Bearer tok"
    assert seen["headers"]["sec-websocket-protocol"] == "v2.other, shoal"


@contextlib.contextmanager
def broken_frame_server() -> Iterator[int]:
    """Completes the WebSocket handshake by hand, then sends a frame with a reserved
    opcode (0x3): a protocol violation no real library would let a server send."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = next(
                line.split(b":", 1)[1].strip()
                for line in request.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(
                hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            conn.sendall(b"\x83\x00")
            with contextlib.suppress(OSError):
                conn.recv(4096)  # the client's close frame (1002); then the TCP close

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)


def test_a_broken_frame_from_the_server_is_a_protocol_error() -> None:
    with broken_frame_server() as port:
        c = Client(f"ws://127.0.0.1:{port}/", timeout=T)
        with pytest.raises(ProtocolError, match="broke the WebSocket protocol"):
            c.receive()
        assert c.close_code == 1006  # the server answered no close frame
        with pytest.raises((ConnectionClosed, ProtocolError)):
            c.send("after")
