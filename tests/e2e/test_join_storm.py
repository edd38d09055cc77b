"""A join storm: 2,000 clients joining one room of one worker at once.

Before the member list was capped and big rooms stopped announcing every join, n joins
cost O(n²) deliveries (each join told every member, and each reply listed every
member): 266 of 2,016 clients timed out joining one worker.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from support import SCALE, Shoal

CLIENTS = 2_000


async def test_two_thousand_clients_join_one_room_within_ten_seconds(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    settings["server"].update(worker_num=1, backlog=4096)
    node = Shoal(tmp_path, settings).start()
    clients: list[ClientConnection] = []
    try:
        gate = asyncio.Semaphore(200)

        async def one(n: int) -> None:
            async with gate:
                ws = await connect(node.url(f"s{n}"), open_timeout=60 * SCALE, max_size=None)
                clients.append(ws)
                await ws.recv()  # welcome

        await asyncio.gather(*(one(n) for n in range(CLIENTS)))

        async def join(ws: ClientConnection) -> dict[str, Any]:
            await ws.send('{"type":"join_room","room":"storm"}')
            while True:
                reply: dict[str, Any] = json.loads(await ws.recv())
                if reply["type"] == "joined_room":
                    return reply

        started = time.monotonic()
        replies = await asyncio.wait_for(asyncio.gather(*(join(ws) for ws in clients)), 30 * SCALE)
        assert time.monotonic() - started < 10 * SCALE
        assert max(r["total_members"] for r in replies) == CLIENTS
        assert all(len(r["members"]) <= 100 for r in replies)

        # The room works at that size: one message reaches every member.
        await clients[0].send('{"type":"room_message","room":"storm","message":"all"}')

        async def hears(ws: ClientConnection) -> None:
            while json.loads(await ws.recv()).get("message") != "all":
                pass

        await asyncio.wait_for(asyncio.gather(*(hears(ws) for ws in clients)), 30 * SCALE)
    finally:
        # All at once: a client with unread notices is slow to close on its own side.
        await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)
        node.stop()
