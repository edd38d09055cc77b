"""Null server for ``--self-test``: the cheapest server speaking the protocol subset.

It runs in its own process on picows + uvloop and does as little as possible
per message, so a self-test measures the load tool's own ceiling rather than a
server's. It is not a reference implementation: it trusts its input.
"""

from __future__ import annotations

import itertools
import multiprocessing
import socket
from multiprocessing.process import BaseProcess
from typing import Any
from urllib.parse import parse_qs

import orjson
import uvloop
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_create_server,
)

_ids = itertools.count(1)


class _Hub:
    def __init__(self) -> None:
        self.users: dict[str, set[WSTransport]] = {}
        self.rooms: dict[str, set[WSTransport]] = {}
        self.everyone: set[WSTransport] = set()


class _Session(WSListener):
    def __init__(self, hub: _Hub, user: str, raw: bool) -> None:
        super().__init__()
        self.hub = hub
        self.user = user
        self.raw = raw
        self.rooms: list[str] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.raw:
            return
        self.hub.everyone.add(transport)
        self.hub.users.setdefault(self.user, set()).add(transport)
        welcome = {"type": "welcome", "user_id": self.user, "connection_id": str(next(_ids))}
        transport.send(WSMsgType.TEXT, orjson.dumps(welcome))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        hub = self.hub
        hub.everyone.discard(transport)
        hub.users.get(self.user, set()).discard(transport)
        for room in self.rooms:
            hub.rooms.get(room, set()).discard(transport)

    def _stream(self, kind: str, message: dict[str, Any], **extra: Any) -> bytes:
        """A delivery of ``message``'s payload from this session's user."""
        body = {"type": kind, "from": self.user, **extra, "message": message["message"]}
        return orjson.dumps({**body, "timestamp": 0})

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return
        payload = frame.get_payload_as_bytes()
        if self.raw:
            transport.send(frame.msg_type, payload)
            return
        message = orjson.loads(payload)
        kind = message.get("type")
        hub = self.hub
        if kind == "join_room":
            room = message["room"]
            members = hub.rooms.setdefault(room, set())
            members.add(transport)
            self.rooms.append(room)
            reply = {"type": "joined_room", "room": room, "members": []}
            transport.send(WSMsgType.TEXT, orjson.dumps(reply))
        elif kind == "room_message":
            out = self._stream("room_message", message, room=message["room"])
            for member in hub.rooms.get(message["room"], ()):
                member.send(WSMsgType.TEXT, out)
        elif kind == "broadcast":
            out = self._stream("broadcast", message)
            for other in hub.everyone:
                if other is not transport:
                    other.send(WSMsgType.TEXT, out)
        elif kind == "private":
            out = self._stream("private_message", message)
            for target in hub.users.get(message["to"], ()):
                target.send(WSMsgType.TEXT, out)
            transport.send(WSMsgType.TEXT, b'{"type":"message_sent","to":"x","timestamp":0}')
        else:
            transport.send(WSMsgType.TEXT, b'{"type":"echo","data":' + payload + b"}")


async def _serve(sock: socket.socket, raw: bool) -> None:
    hub = _Hub()

    def route(request: WSUpgradeRequest) -> _Session:
        query = parse_qs(request.path.partition(b"?")[2].decode())
        user = query.get("user_id", [f"user-{next(_ids)}"])[0]
        return _Session(hub, user, raw)

    server = await ws_create_server(route, sock=sock)
    await server.serve_forever()


def _main(sock: socket.socket, raw: bool) -> None:
    uvloop.run(_serve(sock, raw))


def start_null_server(raw: bool) -> tuple[str, BaseProcess]:
    """Start the null server in a new process; returns its ``ws://`` URL and process."""
    # Bind here so the port is known (and listening) before the child starts.
    sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = sock.getsockname()[1]
    proc = multiprocessing.get_context("spawn").Process(target=_main, args=(sock, raw), daemon=True)
    proc.start()
    sock.close()
    return f"ws://127.0.0.1:{port}/ws", proc
