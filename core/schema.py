"""The message schema of shoal's wire protocol, defined once: close codes and what a client
should do after each, and every JSON message of the built-in chat application.

The chat app, the load tool, its null server and the tests build and check messages with
these types; docs/protocol.md shows them, and a test validates each of its examples here.
Names follow the protocol: `ClientX` is what a client sends, the rest is what it receives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum, IntEnum, unique
from typing import Any, Literal, NotRequired

# pydantic validates TypedDicts only from typing_extensions before Python 3.12.
from typing_extensions import TypedDict

# Close codes and what they mean to a client


@unique  # two names for one number would silently alias: refuse it at import time
class CloseCode(IntEnum):
    """Every close code shoal sends. `ADVICE` says what a client should do after each."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    SLOW_CONSUMER = 4000
    IDLE_TIMEOUT = 4001
    TOKEN_EXPIRED = 4002
    KICKED = 4003
    BANNED = 4004


class Reconnect(Enum):
    """When a client should reconnect after a close."""

    PROMPTLY = "promptly"
    """The server is restarting or stopping: after a short random delay (spreads the herd)."""
    BACKOFF = "backoff"
    """With exponential backoff and full jitter."""
    NEVER = "never"
    """Not as it is: fix what the reason names first, or leave it to the user."""
    OPTIONAL = "optional"
    """An ordinary close: only if the client wants to."""


@dataclass(frozen=True, slots=True)
class Advice:
    """What a close code means to a client (docs/protocol.md has the same table)."""

    reason: str
    """What the code means; also the reason text shoal sends with it when it has nothing
    more specific to say (1008 and 1009, for instance, carry their own)."""
    reconnect: Reconnect
    resync: bool
    """Whether a reconnected client must rejoin its rooms and set its metadata again."""


ADVICE: dict[CloseCode, Advice] = {
    CloseCode.NORMAL: Advice("normal closure", Reconnect.OPTIONAL, resync=True),
    CloseCode.GOING_AWAY: Advice("server shutting down", Reconnect.PROMPTLY, resync=True),
    CloseCode.PROTOCOL_ERROR: Advice("protocol error", Reconnect.NEVER, resync=True),
    CloseCode.INVALID_DATA: Advice("invalid data", Reconnect.NEVER, resync=True),
    CloseCode.POLICY_VIOLATION: Advice("policy violation", Reconnect.NEVER, resync=False),
    CloseCode.MESSAGE_TOO_BIG: Advice("message too big", Reconnect.BACKOFF, resync=True),
    CloseCode.INTERNAL_ERROR: Advice("internal error", Reconnect.BACKOFF, resync=True),
    CloseCode.SERVICE_RESTART: Advice("service restart", Reconnect.PROMPTLY, resync=True),
    CloseCode.TRY_AGAIN_LATER: Advice("redis unavailable", Reconnect.BACKOFF, resync=True),
    CloseCode.SLOW_CONSUMER: Advice("slow consumer", Reconnect.BACKOFF, resync=True),
    CloseCode.IDLE_TIMEOUT: Advice("idle timeout", Reconnect.BACKOFF, resync=True),
    CloseCode.TOKEN_EXPIRED: Advice("token expired", Reconnect.NEVER, resync=True),
    CloseCode.KICKED: Advice("kicked", Reconnect.NEVER, resync=True),
    CloseCode.BANNED: Advice("banned", Reconnect.NEVER, resync=True),
}
"""Every code shoal sends, with the reason text it sends and the client's next step."""


def advice(code: int) -> Advice:
    """What to do after a close with `code`, including codes shoal never sends.

    1006 (the connection dropped without a close frame) and unknown codes reconnect with
    backoff and resync.
    """
    try:
        return ADVICE[CloseCode(code)]
    except ValueError:
        return Advice("connection lost", Reconnect.BACKOFF, resync=True)


# Client -> server messages of the chat application


class ClientBroadcast(TypedDict):
    type: Literal["broadcast"]
    message: Any


class ClientPrivate(TypedDict):
    type: Literal["private"]
    to: str
    message: Any


class RoomPosition(TypedDict):
    """Where a client left a room with a history: the offset and epoch it last saw."""

    offset: str
    epoch: str


class ClientJoinRoom(TypedDict):
    type: Literal["join_room"]
    room: str
    since: NotRequired[RoomPosition]
    """A room with a history: send what it said after this first (a resume)."""


class ClientLeaveRoom(TypedDict):
    type: Literal["leave_room"]
    room: str


class ClientRoomMessage(TypedDict):
    type: Literal["room_message"]
    room: str
    message: Any


class ClientSubscribe(TypedDict):
    type: Literal["subscribe"]
    channel: str


class ClientUnsubscribe(TypedDict):
    type: Literal["unsubscribe"]
    channel: str


class ClientPublish(TypedDict):
    type: Literal["publish"]
    channel: str
    message: Any


class ClientSetMetadata(TypedDict):
    type: Literal["set_metadata"]
    metadata: dict[str, Any]


class _ClientPresence(TypedDict):
    type: Literal["presence"]


class ClientPresence(_ClientPresence, total=False):
    room: str


class _ClientKickUser(TypedDict):
    type: Literal["kick_user"]
    user_id: str


class ClientKickUser(_ClientKickUser, total=False):
    reason: str


class _ClientBanUser(TypedDict):
    type: Literal["ban_user"]
    user_id: str
    duration: int


class ClientBanUser(_ClientBanUser, total=False):
    reason: str


class ClientUnbanUser(TypedDict):
    type: Literal["unban_user"]
    user_id: str


class ClientAdminBroadcast(TypedDict):
    type: Literal["admin_broadcast"]
    message: Any


class ClientRefresh(TypedDict):
    type: Literal["refresh"]
    token: str


# Server -> client messages of the chat application


class Welcome(TypedDict):
    type: Literal["welcome"]
    user_id: str
    connection_id: str


class Authenticated(TypedDict):
    """The first message of a connection that presented a valid token (not `welcome`)."""

    type: Literal["authenticated"]
    user_id: str
    role: str
    connection_id: str


class Refreshed(TypedDict):
    type: Literal["refreshed"]
    expires_at: int


class Kicked(TypedDict):
    type: Literal["kicked"]
    by: str
    reason: str


class Banned(TypedDict):
    type: Literal["banned"]
    by: str
    reason: str
    until: int


class UserKicked(TypedDict):
    type: Literal["user_kicked"]
    user_id: str
    connections: int


class UserBanned(TypedDict):
    type: Literal["user_banned"]
    user_id: str
    until: int
    connections: int


class UserUnbanned(TypedDict):
    type: Literal["user_unbanned"]
    user_id: str
    was_banned: bool


class AdminBroadcast(TypedDict):
    type: Literal["admin_broadcast"]
    message: Any
    timestamp: int


class UserConnected(TypedDict):
    type: Literal["user_connected"]
    user_id: str
    total_users: int


class UserDisconnected(TypedDict):
    type: Literal["user_disconnected"]
    user_id: str
    total_users: int


# `from` is a Python keyword, so these use the functional syntax.
Broadcast = TypedDict(
    "Broadcast",
    {"type": Literal["broadcast"], "from": str, "message": Any, "timestamp": int},
)
PrivateMessage = TypedDict(
    "PrivateMessage",
    {"type": Literal["private_message"], "from": str, "message": Any, "timestamp": int},
)
RoomMessage = TypedDict(
    "RoomMessage",
    {
        "type": Literal["room_message"],
        "from": str,
        "room": str,
        "message": Any,
        "timestamp": int,
        # In a room with a history (`app.history`): its position there, and the epoch.
        "offset": NotRequired[str],
        "epoch": NotRequired[str],
    },
)
ChannelMessage = TypedDict(
    "ChannelMessage",
    {
        "type": Literal["message"],
        "channel": str,
        "from": str,
        "message": Any,
        "timestamp": int,
    },
)


class MessageSent(TypedDict):
    type: Literal["message_sent"]
    to: str
    timestamp: int


class JoinedRoom(TypedDict):
    type: Literal["joined_room"]
    room: str
    members: list[str]
    total_members: int
    offset: NotRequired[str]
    """A room with a history: its last message's offset when the join was recorded."""
    epoch: NotRequired[str]
    recovered: NotRequired[bool]
    """A join with `since`: whether the messages after it were all sent."""
    reason: NotRequired[str]


class LeftRoom(TypedDict):
    type: Literal["left_room"]
    room: str


class UserJoinedRoom(TypedDict):
    type: Literal["user_joined_room"]
    user_id: str
    room: str
    total_members: int
    offset: NotRequired[str]
    """In a room with a history (`app.history`): its position there, `<n>-0`."""
    epoch: NotRequired[str]


class UserLeftRoom(TypedDict):
    type: Literal["user_left_room"]
    user_id: str
    room: str
    total_members: int
    offset: NotRequired[str]
    """In a room with a history (`app.history`): its position there, `<n>-0`."""
    epoch: NotRequired[str]


class Subscribed(TypedDict):
    type: Literal["subscribed"]
    channel: str


class Unsubscribed(TypedDict):
    type: Literal["unsubscribed"]
    channel: str


class MetadataUpdated(TypedDict):
    type: Literal["metadata_updated"]
    metadata: dict[str, Any]


class PresenceEntry(TypedDict):
    user_id: str
    rooms: list[str]
    metadata: dict[str, Any]


class _Presence(TypedDict):
    type: Literal["presence"]
    users: list[PresenceEntry]


class Presence(_Presence, total=False):
    room: str


class Echo(TypedDict):
    type: Literal["echo"]
    data: dict[str, Any]


class Error(TypedDict):
    type: Literal["error"]
    message: str


class _ClientTask(TypedDict):
    type: Literal["task"]
    task: str


class ClientTask(_ClientTask, total=False):
    data: Any


class ClientTaskStatus(TypedDict):
    type: Literal["task_status"]
    task_id: str


class TaskDispatched(TypedDict):
    type: Literal["task_dispatched"]
    task_id: str
    task: str


class TaskResult(TypedDict):
    type: Literal["task_result"]
    task_id: str
    task: str
    result: Any


class TaskError(TypedDict):
    type: str
    message: str


class TaskFailed(TypedDict):
    type: Literal["task_failed"]
    task_id: str
    task: str
    error: TaskError


class TaskStatus(TypedDict):
    """The reply to `task_status` while the job has no outcome (else its outcome)."""

    type: Literal["task_status"]
    task_id: str
    state: Literal["queued", "running", "unknown"]


ClientMessage = (
    ClientBroadcast
    | ClientPrivate
    | ClientJoinRoom
    | ClientLeaveRoom
    | ClientRoomMessage
    | ClientSubscribe
    | ClientUnsubscribe
    | ClientPublish
    | ClientSetMetadata
    | ClientPresence
    | ClientTask
    | ClientTaskStatus
    | ClientKickUser
    | ClientBanUser
    | ClientUnbanUser
    | ClientAdminBroadcast
    | ClientRefresh
)
ServerMessage = (
    Welcome
    | Authenticated
    | Refreshed
    | Kicked
    | Banned
    | UserKicked
    | UserBanned
    | UserUnbanned
    | AdminBroadcast
    | UserConnected
    | UserDisconnected
    | Broadcast
    | PrivateMessage
    | MessageSent
    | JoinedRoom
    | LeftRoom
    | UserJoinedRoom
    | UserLeftRoom
    | RoomMessage
    | Subscribed
    | Unsubscribed
    | ChannelMessage
    | MetadataUpdated
    | Presence
    | Echo
    | TaskDispatched
    | TaskResult
    | TaskFailed
    | TaskStatus
    | Error
)

CLIENT_TYPES: dict[str, type[Any]] = {
    "broadcast": ClientBroadcast,
    "private": ClientPrivate,
    "join_room": ClientJoinRoom,
    "leave_room": ClientLeaveRoom,
    "room_message": ClientRoomMessage,
    "subscribe": ClientSubscribe,
    "unsubscribe": ClientUnsubscribe,
    "publish": ClientPublish,
    "set_metadata": ClientSetMetadata,
    "presence": ClientPresence,
    "task": ClientTask,
    "task_status": ClientTaskStatus,
    "kick_user": ClientKickUser,
    "ban_user": ClientBanUser,
    "unban_user": ClientUnbanUser,
    "admin_broadcast": ClientAdminBroadcast,
    "refresh": ClientRefresh,
}
SERVER_TYPES: dict[str, type[Any]] = {
    "welcome": Welcome,
    "authenticated": Authenticated,
    "refreshed": Refreshed,
    "kicked": Kicked,
    "banned": Banned,
    "user_kicked": UserKicked,
    "user_banned": UserBanned,
    "user_unbanned": UserUnbanned,
    "admin_broadcast": AdminBroadcast,
    "user_connected": UserConnected,
    "user_disconnected": UserDisconnected,
    "broadcast": Broadcast,
    "private_message": PrivateMessage,
    "message_sent": MessageSent,
    "joined_room": JoinedRoom,
    "left_room": LeftRoom,
    "user_joined_room": UserJoinedRoom,
    "user_left_room": UserLeftRoom,
    "room_message": RoomMessage,
    "subscribed": Subscribed,
    "unsubscribed": Unsubscribed,
    "message": ChannelMessage,
    "metadata_updated": MetadataUpdated,
    "presence": Presence,
    "echo": Echo,
    "error": Error,
    "task_dispatched": TaskDispatched,
    "task_result": TaskResult,
    "task_failed": TaskFailed,
    "task_status": TaskStatus,
}


@functools.cache
def _validator(kind: Any) -> Any:
    # Built on first use: the worker's hot path never validates, and pydantic's
    # schema build would otherwise cost every process that imports this module.
    from pydantic import ConfigDict, TypeAdapter  # noqa: PLC0415

    typed: Any
    for typed in (kind, PresenceEntry, TaskError):
        typed.__pydantic_config__ = ConfigDict(extra="forbid", strict=True)
    return TypeAdapter(kind)


def check_server_message(message: dict[str, Any]) -> None:
    """Check that `message` is a chat server message exactly as the schema defines it.

    Raises:
        ValueError: unknown type, a missing or extra field, or a field of the wrong type.
    """
    _check(SERVER_TYPES, message)


def check_client_message(message: dict[str, Any]) -> None:
    """Check that `message` is a chat client message exactly as the schema defines it.

    Raises:
        ValueError: as `check_server_message`.
    """
    _check(CLIENT_TYPES, message)


def _check(types: dict[str, Any], message: dict[str, Any]) -> None:
    kind = types.get(message.get("type"))  # type: ignore[arg-type]
    if kind is None:
        raise ValueError(f"unknown message type: {message.get('type')!r}")
    _validator(kind).validate_python(message)  # pydantic's ValidationError is a ValueError
