"""Limits that protect the server: slow consumers, oversized frames, idle clients."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support import SCALE, UNLIMITED, Shoal, client, masked_frame, upgrade_request


def raw_websocket(port: int, path: str = "/ws", rcvbuf: int | None = None) -> socket.socket:
    """A hand-made WebSocket client: handshake done, then it does only what the test says."""
    sock = socket.socket()
    sock.settimeout(5 * SCALE)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request(path))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def read_close_code(sock: socket.socket, timeout: float) -> int:
    """Read frames until the close frame; return its code."""
    sock.settimeout(timeout * SCALE)
    buffer = b""

    def fill(size: int) -> bytes:
        """`buffer` holding at least `size` bytes; fails if the connection ends first."""
        nonlocal buffer
        while len(buffer) < size:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise AssertionError("connection closed without a close frame")
            buffer += chunk
        return buffer

    while True:
        fill(2)
        opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
        offset = 2
        if length == 126:
            length, offset = struct.unpack("!H", fill(4)[2:4])[0], 4
        elif length == 127:
            length, offset = struct.unpack("!Q", fill(10)[2:10])[0], 10
        fill(offset + length)
        if opcode == 0x8:
            return int(struct.unpack("!H", buffer[offset : offset + 2])[0])
        buffer = buffer[offset + length :]


@pytest.fixture
def tight_node(tmp_path: Path, settings: dict[str, Any]) -> Iterator[Shoal]:
    """One worker whose clients may leave 256 KiB unread before they are cut off."""
    settings["server"].update(
        worker_num=1, buffer_output_size=256 * 1024, max_message_size=64 * 1024
    )
    settings["limits"] = dict(UNLIMITED)  # its clients flood on purpose: the limit under test
    node = Shoal(tmp_path, settings).start()
    yield node
    node.stop()


async def test_slow_consumer_is_cut_off_while_others_keep_receiving(tight_node: Shoal) -> None:
    """A client that stops reading is closed with 4000; the room's others keep receiving."""
    node = tight_node
    slow: socket.socket | None = None
    try:
        # A client that joins a room, then never reads again, behind a small socket buffer.
        slow = raw_websocket(node.port, "/ws?user_id=slow", rcvbuf=4096)
        slow.sendall(masked_frame(b'{"type":"join_room","room":"firehose"}'))
        async with client(node.url("fast")) as fast, client(node.url("pub")) as pub:
            await fast.request({"type": "join_room", "room": "firehose"}, "joined_room")
            await pub.request({"type": "join_room", "room": "firehose"}, "joined_room")
            await fast.expect("user_joined_room")
            payload = "x" * 60_000
            # ~12 MB in all: past what the kernel buffers on loopback (tcp_wmem max is
            # often 4 MB), then past the slow client's 256 KiB of user-space buffer.
            left: list[str] = []

            async def next_message(c: Any) -> Any:
                while (message := await c.recv())["type"] == "user_left_room":
                    left.append(message["user_id"])
                return message

            for n in range(200):
                await pub.send(
                    {"type": "room_message", "room": "firehose", "message": [n, payload]}
                )
                for member in (fast, pub):
                    message = await next_message(member)
                    assert message["type"] == "room_message" and message["message"][0] == n
            # The slow client reads its backlog and finds it was closed as a slow consumer.
            assert await asyncio.to_thread(read_close_code, slow, 10) == 4000
            # Others were not held back, and the server forgot the slow client.
            if "slow" not in left:
                assert (await fast.expect("user_left_room"))["user_id"] == "slow"
            presence = await fast.request({"type": "presence", "room": "firehose"}, "presence")
            assert [u["user_id"] for u in presence["users"]] == ["fast", "pub"]
        assert "slow consumer" in node.log()
    finally:
        if slow is not None:
            slow.close()


async def test_a_client_that_floods_requests_and_never_reads_is_cut_off(
    tight_node: Shoal,
) -> None:
    """Replies to a read leave together after it: a client sending request after request
    without reading a reply is closed with 4000 once they pile up, not served forever."""
    node = tight_node
    flood: socket.socket | None = None
    try:
        flood = raw_websocket(node.port, "/ws?user_id=flood", rcvbuf=4096)
        # Each is echoed by the chat app ({"type":"echo","data":...}): ~20 MB of replies.
        request = masked_frame(b'{"type":"ping-me","pad":"' + b"x" * 50_000 + b'"}')

        def send_all(sock: socket.socket) -> None:
            try:
                for _ in range(400):
                    sock.sendall(request)
            except OSError:
                pass  # closed by the server, as it should be

        async with client(node.url("other")) as other:
            await asyncio.to_thread(send_all, flood)
            assert await asyncio.to_thread(read_close_code, flood, 10) == 4000
            reply = await other.request({"type": "still-served"}, "echo")
            assert reply["data"] == {"type": "still-served"}
        assert "slow consumer" in node.log()
    finally:
        if flood is not None:
            flood.close()


async def test_frame_over_max_message_size_closes_with_1009(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """A frame over max_message_size closes that connection with 1009, and only that one."""
    settings["server"].update(max_message_size=1024)
    node = Shoal(tmp_path, settings).start()
    try:
        async with client(node.url("big")) as big, client(node.url("other")) as other:
            await big.ws.send("x" * 1000)  # under the limit: an ordinary error reply
            assert (await big.expect("error"))["message"] == "Invalid message format"
            await big.ws.send("x" * 2000)
            with pytest.raises(ConnectionClosed):
                await big.recv()
            assert big.ws.close_code == 1009
            assert (await other.request({"type": "x"}, "echo"))["data"] == {"type": "x"}
    finally:
        node.stop()


async def test_idle_client_is_closed_and_pinged_client_is_not(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """A client that never answers pings is closed with 4001; one that answers stays."""
    settings["server"].update(heartbeat_check_interval=0.5, heartbeat_idle_time=1.5)
    node = Shoal(tmp_path, settings).start()
    try:
        # websockets answers pings by itself, so this client stays although it sends nothing.
        async with client(node.url("alive")) as alive:
            silent = raw_websocket(node.port)  # never answers pings
            assert await asyncio.to_thread(read_close_code, silent, 6) == 4001
            silent.close()
            assert (await alive.request({"type": "still"}, "echo"))["data"] == {"type": "still"}
    finally:
        node.stop()


async def test_invalid_user_id_is_refused_at_the_handshake(shoal: Shoal) -> None:
    """A user_id that is not a valid name is refused with 400 before any frame, and says why."""
    with pytest.raises(InvalidStatus) as refused:
        async with client(shoal.url("bad%21user"), welcome=None):
            pass
    response = refused.value.response
    assert response.status_code == 400
    assert json.loads(response.body) == {"error": "bad request", "reason": "Invalid user_id"}


async def test_rooms_and_channels_per_connection_are_bounded(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """One connection cannot make its worker subscribe to unbounded rooms or channels."""
    settings["limits"] = {"max_rooms": 3, "max_channels": 2}
    node = Shoal(tmp_path, settings).start()
    try:
        async with client(node.url("many")) as c:
            for n in range(3):
                await c.request({"type": "join_room", "room": f"r{n}"}, "joined_room")
            refused = await c.request({"type": "join_room", "room": "r3"}, "error")
            assert refused["message"] == "Too many rooms: at most 3 per connection"
            # Joining again a room it is in is not a new room; leaving frees a place.
            await c.request({"type": "join_room", "room": "r0"}, "joined_room")
            await c.request({"type": "leave_room", "room": "r0"}, "left_room")
            await c.request({"type": "join_room", "room": "r3"}, "joined_room")
            for n in range(2):
                await c.request({"type": "subscribe", "channel": f"c{n}"}, "subscribed")
            refused = await c.request({"type": "subscribe", "channel": "c2"}, "error")
            assert refused["message"] == "Too many channels: at most 2 per connection"
            presence = await c.request({"type": "presence"}, "presence")
            assert presence["users"][0]["rooms"] == ["r1", "r2", "r3"]
    finally:
        node.stop()
