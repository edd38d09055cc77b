"""The built-in chat application: the protocol in docs/protocol.md, written on the App API.

Settings (the `app` config section): `announce_connections` (default false) tells every
connection of every other user when someone connects or disconnects. It is off by
default because a storm of n connections then costs n² deliveries.
"""

from __future__ import annotations

import time
from typing import Any

from shoal.server import protocol
from shoal.server.app import App, Connection, Hub
from shoal.server.errors import ProtocolError
from shoal.workers.keys import TopicKind

app = App()


def _now() -> int:
    return protocol.timestamp(time.time())


def _announce() -> bool:
    return bool(app.settings.get("announce_connections", False))


@app.on_open
async def welcome(conn: Connection) -> None:
    await conn.send({"type": "welcome", "user_id": conn.user_id, "connection_id": conn.id})
    if _announce():
        total = await conn.hub.total_users()
        await conn.hub.broadcast(
            {"type": "user_connected", "user_id": conn.user_id, "total_users": total},
            exclude=conn,
        )


@app.on_close
async def goodbye(conn: Connection) -> None:
    for room in list(conn.rooms):
        await _leave(conn, room)
    if _announce():
        # This connection is still counted; its user goes only with their last connection.
        last = len(await conn.hub.registry.user_connections(conn.user_id)) <= 1
        total = await conn.hub.total_users() - (1 if last else 0)
        await conn.hub.broadcast(
            {"type": "user_disconnected", "user_id": conn.user_id, "total_users": total},
            exclude=conn,
        )


@app.on_departed
async def departed(hub: Hub, user_id: str, rooms: list[str]) -> None:
    """A worker or node died with this user's connection: tell its rooms, as on close."""
    for room in rooms:
        remaining = await hub.room_members(room)
        if remaining:
            await hub.publish(
                room,
                {
                    "type": "user_left_room",
                    "user_id": user_id,
                    "room": room,
                    "total_members": len(remaining),
                },
            )
    if _announce():
        total = await hub.total_users()
        await hub.broadcast({"type": "user_disconnected", "user_id": user_id, "total_users": total})


@app.on("broadcast")
async def broadcast(conn: Connection, message: dict[str, Any]) -> None:
    text = protocol.field(message, "message")
    await conn.hub.broadcast(
        {"type": "broadcast", "from": conn.user_id, "message": text, "timestamp": _now()},
        exclude=conn,
    )


@app.on("private")
async def private(conn: Connection, message: dict[str, Any]) -> None:
    to = protocol.name_field(message, "to")
    text = protocol.field(message, "message")
    now = _now()
    reached = await conn.hub.send_to_user(
        to, {"type": "private_message", "from": conn.user_id, "message": text, "timestamp": now}
    )
    if not reached:
        raise ProtocolError("User not found")
    await conn.send({"type": "message_sent", "to": to, "timestamp": now})


@app.on("join_room")
async def join_room(conn: Connection, message: dict[str, Any]) -> None:
    room = protocol.name_field(message, "room")
    already = room in conn.rooms
    members = await conn.join(room)
    await conn.send({"type": "joined_room", "room": room, "members": members})
    if not already:
        await conn.hub.publish(
            room,
            {
                "type": "user_joined_room",
                "user_id": conn.user_id,
                "room": room,
                "total_members": len(members),
            },
            exclude=conn,
        )


@app.on("leave_room")
async def leave_room(conn: Connection, message: dict[str, Any]) -> None:
    room = protocol.name_field(message, "room")
    await _leave(conn, room)
    await conn.send({"type": "left_room", "room": room})


async def _leave(conn: Connection, room: str) -> None:
    remaining = await conn.leave(room)
    if remaining:
        await conn.hub.publish(
            room,
            {
                "type": "user_left_room",
                "user_id": conn.user_id,
                "room": room,
                "total_members": len(remaining),
            },
        )


@app.on("room_message")
async def room_message(conn: Connection, message: dict[str, Any]) -> None:
    room = protocol.name_field(message, "room")
    text = protocol.field(message, "message")
    if room not in conn.rooms:
        raise ProtocolError("Not in room")
    await conn.hub.publish(
        room,
        {
            "type": "room_message",
            "from": conn.user_id,
            "room": room,
            "message": text,
            "timestamp": _now(),
        },
    )


@app.on("subscribe")
async def subscribe(conn: Connection, message: dict[str, Any]) -> None:
    channel = protocol.name_field(message, "channel")
    await conn.subscribe(channel)
    await conn.send({"type": "subscribed", "channel": channel})


@app.on("unsubscribe")
async def unsubscribe(conn: Connection, message: dict[str, Any]) -> None:
    channel = protocol.name_field(message, "channel")
    await conn.unsubscribe(channel)
    await conn.send({"type": "unsubscribed", "channel": channel})


@app.on("publish")
async def publish(conn: Connection, message: dict[str, Any]) -> None:
    channel = protocol.name_field(message, "channel")
    text = protocol.field(message, "message")
    await conn.hub.publish(
        channel,
        {
            "type": "message",
            "channel": channel,
            "from": conn.user_id,
            "message": text,
            "timestamp": _now(),
        },
        kind=TopicKind.CHANNEL,
    )


@app.on("set_metadata")
async def set_metadata(conn: Connection, message: dict[str, Any]) -> None:
    metadata = protocol.field(message, "metadata")
    if not isinstance(metadata, dict):
        raise ProtocolError("Invalid metadata")
    merged = await conn.set_metadata(metadata)
    await conn.send({"type": "metadata_updated", "metadata": merged})


@app.on("presence")
async def presence(conn: Connection, message: dict[str, Any]) -> None:
    room = protocol.name_field(message, "room") if "room" in message else None
    reply: dict[str, Any] = {"type": "presence", "users": await conn.hub.presence(room)}
    if room is not None:
        reply["room"] = room
    await conn.send(reply)


@app.on_unknown
async def echo(conn: Connection, message: dict[str, Any]) -> None:
    await conn.send({"type": "echo", "data": message})


@app.on_binary
async def echo_binary(conn: Connection, data: bytes) -> None:
    await conn.send_bytes(data)
