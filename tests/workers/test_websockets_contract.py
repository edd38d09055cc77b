"""What shoal relies on inside websockets, beyond its documented API.

The worker subclasses websockets' asyncio `ServerConnection` and writes pre-built frames
straight to its transport (one encoding and one framing per message, whatever the number
of recipients). pyproject.toml pins websockets below its next major version; these tests
fail loudly, naming what moved, if an upgrade changes any of it.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import version

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.protocol import OPEN

from shoal.core import protocol
from shoal.workers.connection import Socket

from support import SCALE


def test_the_pinned_major_version() -> None:
    assert version("websockets").split(".")[0] == "17", (
        "websockets changed major version: check shoal.workers.connection against it, "
        "then move the pin in pyproject.toml"
    )


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_a_connection_subclass_and_frames_written_to_its_transport(
    compression: str | None,
) -> None:
    seen: list[Socket] = []
    done = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        assert isinstance(connection, Socket), "serve(create_connection=...) was ignored"
        seen.append(connection)
        # The hooks the worker overrides, and the attributes it reads.
        assert connection.protocol.state is OPEN
        assert connection.request is not None and connection.request.path == "/ws?user_id=x"
        assert connection.remote_address is not None
        # The worker frames once for everyone unless the connection compresses.
        assert bool(connection.protocol.extensions) == (compression is not None)
        first = connection.last_seen
        await connection.recv()
        assert connection.last_seen > first, "data_received() is no longer called"
        if compression is None:
            # A frame built once, written to the transport as bytes (the fan-out path).
            connection.transport.write(protocol.frame(b'{"n":1}'))
        else:
            connection.protocol.send_text(b'{"n":1}')
        # A frame through the protocol object, flushed by send_data() (the deflate path).
        connection.protocol.send_text(b'{"n":2}')
        connection.send_data()
        await done.wait()

    async with serve(
        handler, "127.0.0.1", 0, create_connection=Socket, compression=compression
    ) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/ws?user_id=x"
        async with connect(url, compression=compression) as ws:
            await ws.send("hello")
            async with asyncio.timeout(5 * SCALE):
                assert await ws.recv() == '{"n":1}'
                assert await ws.recv() == '{"n":2}'
            done.set()
    assert len(seen) == 1
    assert websockets.version.version.startswith("17.")
