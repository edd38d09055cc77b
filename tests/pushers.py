"""A Pusher client over plain websockets, for the Pusher endpoint's tests: neither the
official clients nor shoal's code, so that what they check is the wire."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from support import SCALE, Shoal


class PusherSocket:
    """A Pusher client speaking protocol 7 over plain websockets."""

    def __init__(self, ws: ClientConnection, established: dict[str, Any]) -> None:
        self.ws = ws
        self.socket_id: str = established["socket_id"]
        self.activity_timeout: int = established["activity_timeout"]

    @property
    def worker(self) -> str:
        return self.socket_id.split(".")[0]

    async def send(self, event: str, data: Any, channel: str | None = None) -> None:
        message: dict[str, Any] = {"event": event, "data": data}
        if channel is not None:
            message["channel"] = channel
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            message: dict[str, Any] = json.loads(await self.ws.recv())
        return message

    async def expect(self, event: str, timeout: float = 5) -> dict[str, Any]:
        """The next frame, which must be `event`; its `data` parsed when a string."""
        return self._parsed(await self.recv(timeout), event)

    @staticmethod
    def _parsed(message: dict[str, Any], event: str) -> dict[str, Any]:
        assert message["event"] == event, message
        data = message.get("data")
        if isinstance(data, str):
            with contextlib.suppress(ValueError):
                message["data"] = json.loads(data)
        return message

    async def silent(self, seconds: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            print(await self.recv(seconds))

    async def subscribe(self, channel: str, **auth: Any) -> dict[str, Any]:
        """Subscribe; the `subscription_succeeded`. A `member_added` of the channel may
        come before it, published while the subscription was under way (docs/pusher.md,
        "Events from just before a subscription"): it is read and skipped."""
        await self.send("pusher:subscribe", {"channel": channel, **auth})
        message = await self.recv()
        while message["event"] == "pusher_internal:member_added" and message["channel"] == channel:
            message = await self.recv()
        return self._parsed(message, "pusher_internal:subscription_succeeded")


def app_url(shoal: Shoal, key: str) -> str:
    return shoal.url(path=f"/app/{key}").split("?")[0] + "?protocol=7&client=js&version=8.6.0"


@contextlib.asynccontextmanager
async def pusher_client(shoal: Shoal, key: str) -> AsyncIterator[PusherSocket]:
    async with connect(app_url(shoal, key), open_timeout=10 * SCALE) as ws:
        first = json.loads(await ws.recv())
        assert first["event"] == "pusher:connection_established", first
        yield PusherSocket(ws, json.loads(first["data"]))


@contextlib.asynccontextmanager
async def spread_clients(shoal: Shoal, key: str, count: int) -> AsyncIterator[list[PusherSocket]]:
    """`count` clients, on both workers."""
    async with contextlib.AsyncExitStack() as stack:
        chosen: list[PusherSocket] = []
        for _ in range(200):
            c = await stack.enter_async_context(pusher_client(shoal, key))
            workers = {x.worker for x in chosen}
            if c.worker in workers and len(workers) < 2 and len(chosen) == count - 1:
                continue
            chosen.append(c)
            if len(chosen) == count:
                break
        assert len({c.worker for c in chosen}) == 2 or count == 1
        yield chosen
