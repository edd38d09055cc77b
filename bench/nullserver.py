# mypy: warn-unreachable
# (A misspelt message type in a `case` below then fails the type check: its branch is dead.)
"""Null server for ``--self-test``: the cheapest server speaking the protocol subset.

It runs in its own process on picows + uvloop and does as little as possible
per message, so a self-test measures the load tool's own ceiling rather than a
server's. It is not a reference implementation: it trusts its input. It shares
nothing with the load tool but the message shapes of ``shoal.core.schema``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import socket
from multiprocessing.process import BaseProcess
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

from shoal.core import schema

_ids = itertools.count(1)

# The load tool reads only the type of a sender's acknowledgement: send the same bytes
# each time rather than encode the real recipient.
_SENT: schema.MessageSent = {"type": "message_sent", "to": "x", "timestamp": 0}
_SENT_JSON = orjson.dumps(_SENT)

# An echo holds the frame verbatim: splice it in rather than decode and encode it again.
# ("data" is the last field, so the last {} is its value.)
_EMPTY_ECHO: schema.Echo = {"type": "echo", "data": {}}
_ECHO_HEAD, _, _ECHO_TAIL = orjson.dumps(_EMPTY_ECHO).rpartition(b"{}")


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
        welcome: schema.Welcome = {
            "type": "welcome",
            "user_id": self.user,
            "connection_id": str(next(_ids)),
        }
        transport.send(WSMsgType.TEXT, orjson.dumps(welcome))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        hub = self.hub
        hub.everyone.discard(transport)
        hub.users.get(self.user, set()).discard(transport)
        for room in self.rooms:
            hub.rooms.get(room, set()).discard(transport)

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
        # Typed, not validated (the input is trusted): each case narrows it to one message.
        message: schema.ClientMessage = orjson.loads(payload)
        hub = self.hub
        match message["type"]:
            case "join_room":
                room = message["room"]
                hub.rooms.setdefault(room, set()).add(transport)
                self.rooms.append(room)
                joined: schema.JoinedRoom = {
                    "type": "joined_room",
                    "room": room,
                    "members": [],
                    "total_members": len(hub.rooms[room]),
                }
                transport.send(WSMsgType.TEXT, orjson.dumps(joined))
            case "room_message":
                room = message["room"]
                to_room: schema.RoomMessage = {
                    "type": "room_message",
                    "from": self.user,
                    "room": room,
                    "message": message["message"],
                    "timestamp": 0,
                }
                out = orjson.dumps(to_room)
                for member in hub.rooms.get(room, ()):
                    member.send(WSMsgType.TEXT, out)
            case "broadcast":
                to_all: schema.Broadcast = {
                    "type": "broadcast",
                    "from": self.user,
                    "message": message["message"],
                    "timestamp": 0,
                }
                out = orjson.dumps(to_all)
                for other in hub.everyone:
                    if other is not transport:
                        other.send(WSMsgType.TEXT, out)
            case "private":
                to_user: schema.PrivateMessage = {
                    "type": "private_message",
                    "from": self.user,
                    "message": message["message"],
                    "timestamp": 0,
                }
                out = orjson.dumps(to_user)
                for target in hub.users.get(message["to"], ()):
                    target.send(WSMsgType.TEXT, out)
                transport.send(WSMsgType.TEXT, _SENT_JSON)
            case _:
                transport.send(WSMsgType.TEXT, _ECHO_HEAD + payload + _ECHO_TAIL)


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
