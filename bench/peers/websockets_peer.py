"""Minimal peer server on plain ``websockets`` speaking shoal's protocol subset.

Single process, uvloop, no compression. Used as a baseline for comparisons and
by the bench's tests. ``--echo`` echoes every frame verbatim (like shoal's
``echo`` app); ``--drop-every N`` silently skips every Nth room-message
delivery, so tests can prove the bench detects loss.

It is a second, independent implementation of the chat protocol, sharing nothing
with shoal but the message shapes of ``shoal.core.schema``: a bug shared by
shoal's server and the bench cannot hide behind it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import uvloop
from websockets.asyncio.connection import broadcast
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from shoal.core import schema


def _error(text: str) -> bytes:
    error: schema.Error = {"type": "error", "message": text}
    return orjson.dumps(error)


_INVALID_FORMAT = _error("Invalid message format")
_USER_NOT_FOUND = _error("User not found")


class Hub:
    """Users, rooms and connections of one server process."""

    def __init__(self, drop_every: int) -> None:
        self.users: dict[str, set[ServerConnection]] = {}
        self.rooms: dict[str, set[ServerConnection]] = {}
        self.everyone: set[ServerConnection] = set()
        self.ids = itertools.count(1)
        self.drop_every = drop_every
        self.deliveries = 0

    async def handle(self, ws: ServerConnection) -> None:
        """Serve one connection until it closes."""
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        user = query.get("user_id", [f"user-{next(self.ids)}"])[0]
        joined: list[str] = []
        self.everyone.add(ws)
        self.users.setdefault(user, set()).add(ws)
        try:
            welcome: schema.Welcome = {
                "type": "welcome",
                "user_id": user,
                "connection_id": str(next(self.ids)),
            }
            await ws.send(orjson.dumps(welcome), text=True)
            async for frame in ws:
                await self._dispatch(ws, user, joined, frame)
        except ConnectionClosed:
            pass
        finally:
            self.everyone.discard(ws)
            self.users[user].discard(ws)
            if not self.users[user]:
                del self.users[user]
            for room in joined:
                self.rooms[room].discard(ws)

    async def _dispatch(
        self, ws: ServerConnection, user: str, joined: list[str], frame: str | bytes
    ) -> None:
        try:
            decoded: Any = orjson.loads(frame)
            # Typed, not validated (fields are read with get): mypy checks each type below.
            message: schema.ClientMessage = decoded
            kind = message.get("type")
        except (orjson.JSONDecodeError, AttributeError):
            await ws.send(_INVALID_FORMAT, text=True)
            return
        now = int(time.time() * 1000)
        if kind == "join_room":
            room = str(message.get("room"))
            members = self.rooms.setdefault(room, set())
            others = list(members)
            members.add(ws)
            joined.append(room)
            names = sorted({u for u, conns in self.users.items() if conns & members})
            reply: schema.JoinedRoom = {
                "type": "joined_room",
                "room": room,
                "members": names,
                "total_members": len(names),
            }
            await ws.send(orjson.dumps(reply), text=True)
            note: schema.UserJoinedRoom = {
                "type": "user_joined_room",
                "user_id": user,
                "room": room,
                "total_members": len(members),
            }
            broadcast(others, orjson.dumps(note), text=True)
        elif kind == "room_message":
            room = str(message.get("room"))
            to_room: schema.RoomMessage = {
                "type": "room_message",
                "from": user,
                "room": room,
                "message": message.get("message"),
                "timestamp": now,
            }
            broadcast(self._keep(self.rooms.get(room, set())), orjson.dumps(to_room), text=True)
        elif kind == "broadcast":
            to_all: schema.Broadcast = {
                "type": "broadcast",
                "from": user,
                "message": message.get("message"),
                "timestamp": now,
            }
            broadcast([c for c in self.everyone if c is not ws], orjson.dumps(to_all), text=True)
        elif kind == "private":
            target = str(message.get("to"))
            if target not in self.users:
                await ws.send(_USER_NOT_FOUND, text=True)
                return
            to_user: schema.PrivateMessage = {
                "type": "private_message",
                "from": user,
                "message": message.get("message"),
                "timestamp": now,
            }
            broadcast(self.users[target], orjson.dumps(to_user), text=True)
            sent: schema.MessageSent = {"type": "message_sent", "to": target, "timestamp": now}
            await ws.send(orjson.dumps(sent), text=True)
        else:
            # Any other type is echoed, as shoal's chat app does (the bench's echo probes).
            echo: schema.Echo = {"type": "echo", "data": decoded}
            await ws.send(orjson.dumps(echo), text=True)

    def _keep(self, members: set[ServerConnection]) -> list[ServerConnection]:
        if not self.drop_every:
            return list(members)
        kept = []
        for member in members:
            self.deliveries += 1
            if self.deliveries % self.drop_every:
                kept.append(member)
        return kept


async def echo(ws: ServerConnection) -> None:
    """Echo every frame verbatim (raw transport comparisons)."""
    try:
        async for frame in ws:
            await ws.send(frame)
    except ConnectionClosed:
        pass


async def serve_forever(host: str, port: int, raw_echo: bool, drop_every: int) -> None:
    """Listen until cancelled; prints ``listening PORT`` once ready."""
    handler = echo if raw_echo else Hub(drop_every).handle
    async with serve(
        handler, host, port, compression=None, max_queue=None, ping_interval=None
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"listening {bound}", flush=True)
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m shoal.bench.peers.websockets_peer --port 9001``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--echo", action="store_true", help="echo frames verbatim")
    parser.add_argument(
        "--drop-every",
        type=int,
        default=0,
        metavar="N",
        help="drop every Nth room-message delivery (for tests)",
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve_forever(args.host, args.port, args.echo, args.drop_every))


if __name__ == "__main__":
    main()
