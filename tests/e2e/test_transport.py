"""The worker's connection layer on the wire: handshake timeout, order, flow control,
compression, and clients that pipeline their first frames with the handshake."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from support import SCALE, UNLIMITED, Shoal, client, pipelined_hello

SLOW_APP = """
import asyncio

from shoal.core.app import App

app = App()


@app.on("slow")
async def slow(conn, message):
    await asyncio.sleep(message["seconds"])
    await conn.send({"type": "slept"})


@app.on("n")
async def number(conn, message):
    await conn.send({"type": "n", "n": message["n"]})
"""


def test_a_client_that_never_completes_the_handshake_is_dropped(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    settings["server"]["handshake_timeout"] = 1
    node = Shoal(tmp_path, settings).start()
    try:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10 * SCALE) as sock:
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and nothing more
            started = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the server
            assert time.monotonic() - started < 3 * SCALE
        assert node.health(expect_ok=True)
    finally:
        node.stop()


async def test_replies_keep_the_order_of_messages_across_a_waiting_handler(
    shoal: Shoal,
) -> None:
    """join_room waits for Redis; the echoes sent right after it still come after it."""
    async with client(shoal.url("ann")) as ann:
        await ann.send({"type": "join_room", "room": "r"})
        for n in range(50):
            await ann.send({"type": "ping", "n": n})
        assert (await ann.recv())["type"] == "joined_room"
        assert [(await ann.expect("echo"))["data"]["n"] for _ in range(50)] == list(range(50))


async def test_a_client_whose_handlers_are_behind_is_not_read_and_loses_nothing(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    settings["app"] = {"module": "slowapp:app"}
    settings["server"]["worker_num"] = 1
    settings["limits"] = dict(UNLIMITED)  # the inbox's bound is under test, not the rate
    node = Shoal(tmp_path, settings).start(app_path=tmp_path)
    try:
        async with connect(node.url(), max_size=None) as ws:
            started = time.monotonic()
            await ws.send(json.dumps({"type": "slow", "seconds": 3}))
            padding = "x" * 500
            count = 60_000  # 30 MB: far more than the kernel buffers on both sides

            async def flood() -> float:
                for n in range(count):
                    await ws.send(json.dumps({"type": "n", "n": n, "pad": padding}))
                return time.monotonic() - started

            sending = asyncio.create_task(flood())
            assert json.loads(await ws.recv()) == {"type": "slept"}
            got: list[int] = []
            async with asyncio.timeout(60 * SCALE):
                while len(got) < count:
                    got.append(json.loads(await ws.recv())["n"])
            # The worker stopped reading while its handler slept, so the client could
            # not send everything before then (unthrottled, 30 MB take well under 1 s).
            assert await sending > 2.5
            assert got == list(range(count))
    finally:
        node.stop()


async def test_permessage_deflate_both_ways(tmp_path: Path, settings: dict[str, Any]) -> None:
    settings["server"]["websocket_compression"] = True
    node = Shoal(tmp_path, settings).start()
    try:
        async with (
            connect(node.url("ann"), compression="deflate") as ann,
            connect(node.url("bo"), compression=None) as bo,
        ):
            assert ann.protocol.extensions and not bo.protocol.extensions
            for ws in (ann, bo):
                assert json.loads(await ws.recv())["type"] == "welcome"
                await ws.send(json.dumps({"type": "join_room", "room": "r"}))
                assert json.loads(await ws.recv())["type"] == "joined_room"
            assert json.loads(await ann.recv())["type"] == "user_joined_room"
            big = "compressible " * 10_000
            await bo.send(json.dumps({"type": "room_message", "room": "r", "message": big}))
            for ws in (ann, bo):
                assert json.loads(await ws.recv())["message"] == big
    finally:
        node.stop()


def test_frames_pipelined_with_the_handshake_are_handled(shoal: Shoal) -> None:
    """A client may send its first frames in the same packet as its upgrade request."""
    data = pipelined_hello(shoal.port, "/ws?user_id=pip")
    assert data.startswith(b"HTTP/1.1 101")
    assert b'"welcome"' in data and b'{"type":"echo","data":{"type":"hello"}}' in data
    assert data.index(b'"welcome"') < data.index(b'"echo"')
