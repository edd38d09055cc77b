"""The built-in chat application: the protocol in docs/protocol.md, written on the App API.

Settings (the `app` config section):

- `announce_connections` (default false) tells every connection of every other user when
  someone connects or disconnects. It is off by default because a storm of n
  connections then costs n² deliveries.
- `joined_members_limit` (default 100): `joined_room` lists at most this many members
  (a sample of a bigger room); `total_members` always gives the room's size.
- `room_notices_limit` (default 100): in a room with more members than this,
  `user_joined_room` and `user_left_room` are not sent. With both, n clients joining
  one room cost O(n) deliveries instead of O(n²), as Pusher bounds presence channels.
"""

from __future__ import annotations

import re
import time
from typing import Any

from shoal.core import history, protocol, schema
from shoal.core.app import App, Connection, Hub, PermissionDenied, TopicKind
from shoal.core.errors import ConfigError, ProtocolError
from shoal.core.schema import ADVICE, CloseCode

app = App()


def _now() -> int:
    return protocol.timestamp(time.time())


# A Redis stream id: two 64-bit numbers in ASCII digits (`\d` would take any script's
# digits). Redis refuses any other id, which the client would read as "Service unavailable".
_TASK_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_ID_PART_LIMIT = 2**64
_DEFAULTS = {"joined_members_limit": 100, "room_notices_limit": 100}


@app.check_settings
def _check(settings: dict[str, Any]) -> None:
    for key, default in _DEFAULTS.items():
        value = settings.get(key, default)
        if type(value) is not int or value < 0:
            raise ConfigError(f"app.{key}: must be an integer ≥ 0, not {value!r}")
    if not isinstance(settings.get("announce_connections", False), bool):
        raise ConfigError("app.announce_connections: must be true or false")


def _announce() -> bool:
    return bool(app.settings.get("announce_connections", False))


def _limit(key: str) -> int:
    return int(app.settings.get(key, _DEFAULTS[key]))


@app.on_open
async def welcome(conn: Connection) -> None:
    greeting: schema.Welcome | schema.Authenticated
    if conn.identity.authenticated:
        greeting = {
            "type": "authenticated",
            "user_id": conn.user_id,
            "role": conn.identity.role,
            "connection_id": conn.id,
        }
    else:
        greeting = {"type": "welcome", "user_id": conn.user_id, "connection_id": conn.id}
    await conn.send(greeting)
    if _announce():
        total = await conn.hub.total_users()
        connected: schema.UserConnected = {
            "type": "user_connected",
            "user_id": conn.user_id,
            "total_users": total,
        }
        await conn.hub.broadcast(connected, exclude=conn)


@app.on_close
async def goodbye(conn: Connection) -> None:
    for room in list(conn.rooms):
        await _leave(conn, room)
    if _announce():
        # This connection is still counted; its user goes only with their last connection.
        last = await conn.hub.user_connections(conn.user_id) <= 1
        total = await conn.hub.total_users() - (1 if last else 0)
        await conn.hub.broadcast(_disconnected(conn.user_id, total), exclude=conn)


@app.on_departed
async def departed(hub: Hub, user_id: str, rooms: list[str]) -> None:
    """This user's connection went without on_close (its worker or node died, or Redis
    was away when it closed): tell its rooms, as on close.

    Unlike on close, the notice goes out even when Redis lists nobody in the room: after
    Redis came back empty, the members' workers may not have written them back yet.
    Publishing to a room nobody is in costs one PUBLISH that reaches no one.
    """
    for room in rooms:
        remaining = await hub.room_members(room, limit=0)
        if remaining.total < _limit("room_notices_limit"):
            await hub.publish(room, _left(user_id, room, remaining.total))
    if _announce():
        await hub.broadcast(_disconnected(user_id, await hub.total_users()))


def _disconnected(user_id: str, total: int) -> schema.UserDisconnected:
    return {"type": "user_disconnected", "user_id": user_id, "total_users": total}


def _left(user_id: str, room: str, total: int) -> schema.UserLeftRoom:
    return {"type": "user_left_room", "user_id": user_id, "room": room, "total_members": total}


@app.on("broadcast")
async def broadcast(conn: Connection, message: dict[str, Any]) -> None:
    out: schema.Broadcast = {
        "type": "broadcast",
        "from": conn.user_id,
        "message": protocol.field(message, "message"),
        "timestamp": _now(),
    }
    await conn.hub.broadcast(out, exclude=conn)


@app.on("private")
async def private(conn: Connection, message: dict[str, Any]) -> None:
    to = protocol.name_field(message, "to")
    text = protocol.field(message, "message")
    now = _now()
    out: schema.PrivateMessage = {
        "type": "private_message",
        "from": conn.user_id,
        "message": text,
        "timestamp": now,
    }
    if not await conn.hub.send_to_user(to, out):
        raise ProtocolError("User not found")
    sent: schema.MessageSent = {"type": "message_sent", "to": to, "timestamp": now}
    await conn.send(sent)


@app.on("join_room")
async def join_room(conn: Connection, message: dict[str, Any]) -> None:
    room = protocol.name_field(message, "room")
    since = None
    if message.get("since") is not None:
        try:
            since = history.since(message["since"])
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
    already = room in conn.rooms
    limit = _limit("joined_members_limit")
    members = await conn.join(room, limit=limit, since=since)
    others = [user for user in members if user != conn.user_id]
    joined: schema.JoinedRoom = {
        "type": "joined_room",
        "room": room,
        "members": [conn.user_id, *others][:limit],  # the joiner first: a client looks
        "total_members": members.total,
    }
    if members.position is not None:
        joined["offset"] = members.position.offset
        joined["epoch"] = members.position.epoch
    if members.recovered is not None:
        joined["recovered"] = members.recovered
        if members.reason is not None:
            joined["reason"] = members.reason
    await conn.send(joined)
    if not already and members.total <= _limit("room_notices_limit"):
        arrived: schema.UserJoinedRoom = {
            "type": "user_joined_room",
            "user_id": conn.user_id,
            "room": room,
            "total_members": members.total,
        }
        await conn.hub.publish(room, arrived, exclude=conn)


@app.on("leave_room")
async def leave_room(conn: Connection, message: dict[str, Any]) -> None:
    room = protocol.name_field(message, "room")
    await _leave(conn, room)
    left: schema.LeftRoom = {"type": "left_room", "room": room}
    await conn.send(left)


async def _leave(conn: Connection, room: str) -> None:
    remaining = await conn.leave(room, limit=0)
    if 0 < remaining.total < _limit("room_notices_limit"):
        await conn.hub.publish(room, _left(conn.user_id, room, remaining.total))


@app.on("room_message")
async def room_message(conn: Connection, message: dict[str, Any]) -> None:
    room = protocol.name_field(message, "room")
    text = protocol.field(message, "message")
    if room not in conn.rooms:
        raise ProtocolError("Not in room")
    out: schema.RoomMessage = {
        "type": "room_message",
        "from": conn.user_id,
        "room": room,
        "message": text,
        "timestamp": _now(),
    }
    await conn.hub.publish(room, out)


@app.on("subscribe")
async def subscribe(conn: Connection, message: dict[str, Any]) -> None:
    channel = protocol.name_field(message, "channel")
    await conn.subscribe(channel)
    subscribed: schema.Subscribed = {"type": "subscribed", "channel": channel}
    await conn.send(subscribed)


@app.on("unsubscribe")
async def unsubscribe(conn: Connection, message: dict[str, Any]) -> None:
    channel = protocol.name_field(message, "channel")
    await conn.unsubscribe(channel)
    unsubscribed: schema.Unsubscribed = {"type": "unsubscribed", "channel": channel}
    await conn.send(unsubscribed)


@app.on("publish")
async def publish(conn: Connection, message: dict[str, Any]) -> None:
    channel = protocol.name_field(message, "channel")
    out: schema.ChannelMessage = {
        "type": "message",
        "channel": channel,
        "from": conn.user_id,
        "message": protocol.field(message, "message"),
        "timestamp": _now(),
    }
    await conn.hub.publish(channel, out, kind=TopicKind.CHANNEL)


@app.on("set_metadata")
async def set_metadata(conn: Connection, message: dict[str, Any]) -> None:
    metadata = protocol.field(message, "metadata")
    if not isinstance(metadata, dict):
        raise ProtocolError("Invalid metadata")
    updated: schema.MetadataUpdated = {
        "type": "metadata_updated",
        "metadata": await conn.set_metadata(metadata),
    }
    await conn.send(updated)


@app.on("presence")
async def presence(conn: Connection, message: dict[str, Any]) -> None:
    room = protocol.name_field(message, "room") if "room" in message else None
    policy, role = conn.hub.policy, conn.identity.role
    if not (policy.may_join(role, room) if room is not None else policy.may_list_everyone(role)):
        raise PermissionDenied
    reply: schema.Presence = {"type": "presence", "users": await conn.hub.presence(room)}
    if room is not None:
        reply["room"] = room
    await conn.send(reply)


@app.on("task")
async def task(conn: Connection, message: dict[str, Any]) -> None:
    name = protocol.field(message, "task")
    if not isinstance(name, str):
        raise ProtocolError("Invalid task")
    task_id = await conn.dispatch(name, message.get("data"))
    dispatched: schema.TaskDispatched = {"type": "task_dispatched", "task_id": task_id,
                                         "task": name}  # fmt: skip
    await conn.send(dispatched)


@app.on("task_status")
async def task_status(conn: Connection, message: dict[str, Any]) -> None:
    task_id = protocol.field(message, "task_id")
    if not isinstance(task_id, str) or not _is_task_id(task_id):
        raise ProtocolError("Invalid task_id")
    status = await conn.hub.tasks.status(task_id, user=conn.user_id)
    await conn.send(status.client_message())


def _is_task_id(text: str) -> bool:
    match = _TASK_ID.fullmatch(text)
    return match is not None and all(int(part) < _ID_PART_LIMIT for part in match.groups())


# Moderation (docs/security.md). Roles as in the guide this protocol follows; `auth.roles`
# in the configuration overrides them.
MODERATORS = ("moderator", "admin")
ADMINS = ("admin",)
MAX_BAN = 366 * 24 * 3600


def _reason(message: dict[str, Any]) -> str:
    reason = message.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 256:
        raise ProtocolError("Invalid reason: text of at most 256 characters")
    return reason


@app.on("kick_user", roles=MODERATORS)
async def kick_user(conn: Connection, message: dict[str, Any]) -> None:
    user = protocol.name_field(message, "user_id")
    kicked: schema.Kicked = {"type": "kicked", "by": conn.user_id, "reason": _reason(message)}
    code = CloseCode.KICKED
    count = await conn.hub.disconnect_user(user, kicked, code, ADVICE[code].reason)
    if not count:
        raise ProtocolError("User not found")
    reply: schema.UserKicked = {"type": "user_kicked", "user_id": user, "connections": count}
    await conn.send(reply)


@app.on("ban_user", roles=ADMINS)
async def ban_user(conn: Connection, message: dict[str, Any]) -> None:
    user = protocol.name_field(message, "user_id")
    duration = protocol.field(message, "duration")
    if type(duration) is not int or not 0 < duration <= MAX_BAN:
        raise ProtocolError(f"Invalid duration: whole seconds from 1 to {MAX_BAN}")
    reason = _reason(message)
    until = int(time.time()) + duration
    await conn.hub.ban(user, duration, {"by": conn.user_id, "reason": reason, "until": until})
    banned: schema.Banned = {"type": "banned", "by": conn.user_id, "reason": reason,
                             "until": until}  # fmt: skip
    code = CloseCode.BANNED
    count = await conn.hub.disconnect_user(user, banned, code, ADVICE[code].reason)
    reply: schema.UserBanned = {"type": "user_banned", "user_id": user, "until": until,
                                "connections": count}  # fmt: skip
    await conn.send(reply)


@app.on("unban_user", roles=ADMINS)
async def unban_user(conn: Connection, message: dict[str, Any]) -> None:
    user = protocol.name_field(message, "user_id")
    reply: schema.UserUnbanned = {"type": "user_unbanned", "user_id": user,
                                  "was_banned": await conn.hub.unban(user)}  # fmt: skip
    await conn.send(reply)


@app.on("admin_broadcast", roles=ADMINS)
async def admin_broadcast(conn: Connection, message: dict[str, Any]) -> None:
    out: schema.AdminBroadcast = {
        "type": "admin_broadcast",
        "message": protocol.field(message, "message"),
        "timestamp": _now(),
    }
    await conn.hub.broadcast(out)


@app.on_unknown
async def echo(conn: Connection, message: dict[str, Any]) -> None:
    echoed: schema.Echo = {"type": "echo", "data": message}
    await conn.send(echoed)


@app.on_binary
async def echo_binary(conn: Connection, data: bytes) -> None:
    await conn.send_bytes(data)
