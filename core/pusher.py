"""The Pusher Channels protocol (version 7), with no I/O: channel names, signatures,
the frames both ends send, and the HTTP API's request signing.

shoal serves Pusher clients (pusher-js, Laravel Echo) on `/app/{key}` and the Pusher
server libraries' HTTP API on `/apps/{id}/...` (`shoal.workers.pusher`). Everything here
follows what the official clients and server libraries compute, so that they work against
shoal unmodified: see docs/pusher.md.

Nothing here awaits, touches Redis or a socket, or reads the clock. Callers pass `now`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from shoal.core.errors import ProtocolError
from shoal.core.schema import CloseCode

MAX_CHANNEL_LENGTH = 200
MAX_EVENT_NAME_LENGTH = 200
SIGNATURE_WINDOW = 600
"""Seconds an HTTP API request's `auth_timestamp` may be off the server's clock."""

_CHANNEL_NAME = re.compile(r"#?[-a-zA-Z0-9_=@,.;]+")
_SOCKET_ID = re.compile(r"\d+\.\d+")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
USER_CHANNEL_PREFIX = "#server-to-user-"


class Close:
    """Pusher's close codes: pusher-js reacts to their range.

    4000-4099 refused, never reconnect; 4100-4199 reconnect after a back-off;
    4200-4299 reconnect at once; 4300+ refused.
    """

    APP_NOT_FOUND = 4001
    APP_DISABLED = 4003
    OVER_QUOTA = 4004
    UNAUTHORIZED = 4009
    OVER_CAPACITY = 4100
    RECONNECT = 4200
    """A reload or a shutdown: reconnect now (to another worker)."""
    PONG_NOT_RECEIVED = 4201
    CLIENT_EVENT_REJECTED = 4301


# What shoal's own close codes become for a Pusher client, which reacts by range.
_FROM_SHOAL: dict[int, int] = {
    CloseCode.GOING_AWAY: Close.RECONNECT,
    CloseCode.SERVICE_RESTART: Close.RECONNECT,
    CloseCode.INTERNAL_ERROR: Close.RECONNECT,
    CloseCode.TRY_AGAIN_LATER: Close.OVER_CAPACITY,
    CloseCode.SLOW_CONSUMER: Close.OVER_CAPACITY,
    CloseCode.IDLE_TIMEOUT: Close.PONG_NOT_RECEIVED,
    CloseCode.POLICY_VIOLATION: Close.CLIENT_EVENT_REJECTED,
    CloseCode.KICKED: Close.UNAUTHORIZED,
    CloseCode.BANNED: Close.UNAUTHORIZED,
}


def close_code(code: int) -> int:
    """The close code a Pusher client gets where shoal would close with `code`: a reload
    or a stop (1012, 1001) is 4200, reconnect now; overload 4100, back off; an idle
    client 4201; others as they are."""
    return _FROM_SHOAL.get(code, code)


class PusherError(ProtocolError):
    """What a client sent is refused: answered with `pusher:error` carrying `code` (None:
    no code) and the message; the connection stays open unless the caller closes it."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ApiError(Exception):
    """An HTTP API request is refused with `status` and a short `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Kind(Enum):
    """What a channel's name prefix makes it."""

    PUBLIC = "public"
    PRIVATE = "private"
    ENCRYPTED = "private-encrypted"
    PRESENCE = "presence"
    USER = "user"
    """`#server-to-user-{id}`: only the connection signed in as that user receives it."""


@dataclass(frozen=True, slots=True)
class Channel:
    """A channel name and what its prefix makes it."""

    name: str
    kind: Kind
    cache: bool
    """A cache channel: the last event is kept and replayed to new subscribers."""

    @property
    def authorized(self) -> bool:
        """Whether subscribing needs a signature (private, encrypted, presence)."""
        return self.kind in (Kind.PRIVATE, Kind.ENCRYPTED, Kind.PRESENCE)

    @property
    def takes_client_events(self) -> bool:
        """Whether `client-*` events may be sent on it (private and presence channels;
        never encrypted ones, whose data the server cannot check)."""
        return self.kind in (Kind.PRIVATE, Kind.PRESENCE)


def channel(name: Any) -> Channel:
    """Parse a channel name.

    Raises:
        PusherError: not a valid channel name.
    """
    if type(name) is not str or not name:
        raise PusherError("Channel name is required")
    return _channel(name)


# Every client event names its channel, and the same few names recur: parsing one (a
# regular expression and a frozen dataclass) was a quarter of a client event's handling.
# Channels are immutable, so a parsed name can be handed out again; refusals are not kept.
@functools.lru_cache(maxsize=4096)
def _channel(name: str) -> Channel:
    if len(name) > MAX_CHANNEL_LENGTH or _CHANNEL_NAME.fullmatch(name) is None:
        raise PusherError(f"Invalid channel name: {name[:MAX_CHANNEL_LENGTH]!r}")
    if name.startswith("#"):
        if not name.startswith(USER_CHANNEL_PREFIX) or len(name) == len(USER_CHANNEL_PREFIX):
            raise PusherError(f"Invalid channel name: {name!r}")
        return Channel(name, Kind.USER, cache=False)
    if name.startswith("private-encrypted-"):
        kind, rest = Kind.ENCRYPTED, name[len("private-encrypted-") :]
    elif name.startswith("private-"):
        kind, rest = Kind.PRIVATE, name[len("private-") :]
    elif name.startswith("presence-"):
        kind, rest = Kind.PRESENCE, name[len("presence-") :]
    else:
        kind, rest = Kind.PUBLIC, name
    return Channel(name, kind, cache=rest.startswith("cache-"))


def user_channel(user_id: str) -> str:
    """The channel a user signed in as `user_id` receives (pusher-js subscribes to it)."""
    return USER_CHANNEL_PREFIX + user_id


def valid_socket_id(socket_id: Any) -> bool:
    """Whether `socket_id` has the `\\d+.\\d+` form the server libraries require."""
    return type(socket_id) is str and _SOCKET_ID.fullmatch(socket_id) is not None


# Signatures


def sign(secret: str, text: str | bytes) -> str:
    """HMAC-SHA256 of `text` with `secret`, in lower-case hex: every Pusher signature."""
    data = text.encode() if isinstance(text, str) else text
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def channel_auth(key: str, secret: str, socket_id: str, name: str, channel_data: str | None) -> str:
    """The `auth` a subscription to `name` needs: `key:signature` over
    `socket_id:channel` (and `:channel_data` on presence channels)."""
    text = f"{socket_id}:{name}" if channel_data is None else f"{socket_id}:{name}:{channel_data}"
    return f"{key}:{sign(secret, text)}"


def user_auth(key: str, secret: str, socket_id: str, user_data: str) -> str:
    """The `auth` of a `pusher:signin`: `key:signature` over `socket_id::user::user_data`."""
    return f"{key}:{sign(secret, f'{socket_id}::user::{user_data}')}"


def check_auth(auth: Any, expected: str) -> bool:
    """Whether a client's `auth` equals the expected one, compared in constant time (the
    key part included, so a signature made for another app's key never passes)."""
    if type(auth) is not str:
        return False
    return hmac.compare_digest(auth.encode(), expected.encode())


# Frames: what the server sends


def frame(event: str, data: Any, channel: str | None = None, **extra: str) -> bytes:
    """A server-to-client frame. `data` goes out as a JSON-encoded string unless it is
    already a string (what the HTTP API received, forwarded byte for byte): pusher-js
    parses a string and takes anything else as it is."""
    message: dict[str, Any] = {"event": event}
    if channel is not None:
        message["channel"] = channel
    message["data"] = data if type(data) is str else orjson.dumps(data).decode()
    message.update(extra)
    return orjson.dumps(message)


def client_event(event: str, channel: str, data: Any, user_id: str | None) -> bytes:
    """A client event as its channel's other subscribers get it: `data` forwarded as the
    sender gave it, `user_id` added on presence channels."""
    message: dict[str, Any] = {"event": event, "channel": channel, "data": data}
    if user_id is not None:
        message["user_id"] = user_id
    return orjson.dumps(message)


def error_frame(message: str, code: int | None) -> bytes:
    """`pusher:error`, whose `data` is an object (pusher-js reads `data.code`)."""
    data: dict[str, Any] = {"code": code, "message": message}
    return orjson.dumps({"event": "pusher:error", "data": data})


def connection_established(socket_id: str, activity_timeout: int) -> bytes:
    """The first frame of every connection; pusher-js fails without `activity_timeout`."""
    data = {"socket_id": socket_id, "activity_timeout": activity_timeout}
    return frame("pusher:connection_established", data)


PONG = orjson.dumps({"event": "pusher:pong", "data": {}})


def subscription_error(name: str, error: str, status: int) -> bytes:
    """A refused subscription: carries the channel, so Laravel Echo's `.error()` fires."""
    data = {"type": "AuthError", "error": error, "status": status}
    return orjson.dumps({"event": "pusher:subscription_error", "channel": name, "data": data})


# Frames: what clients send


@dataclass(frozen=True, slots=True)
class ClientFrame:
    """One frame from a Pusher client."""

    event: str
    channel: str | None
    data: Any
    """As sent: an object for `pusher:*` events, anything for client events."""


def parse(raw: str | bytes) -> ClientFrame:
    """Decode one client frame.

    Raises:
        PusherError: not JSON, not an object, or no string `event`.
    """
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise PusherError("Invalid JSON") from None
    if type(message) is not dict:
        raise PusherError("Invalid message: expected a JSON object")
    event = message.get("event")
    if type(event) is not str or not event:
        raise PusherError("Invalid message: no event")
    name = message.get("channel")
    if name is not None and type(name) is not str:
        raise PusherError("Invalid message: channel must be a string")
    return ClientFrame(event, name, message.get("data"))


def _event_object(data: Any, what: str) -> dict[str, Any]:
    """A `pusher:*` event's data as an object: pusher-js sends one, some clients send it
    JSON-encoded.

    Raises:
        PusherError: "Invalid `what` data": neither.
    """
    if type(data) is str:
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            data = None
    if type(data) is not dict:
        raise PusherError(f"Invalid {what} data")
    return data


def subscription(data: Any) -> tuple[Any, Any, str | None]:
    """The channel, `auth` and `channel_data` of a `pusher:subscribe`'s data, channel and
    `auth` unchecked.

    Raises:
        PusherError: malformed.
    """
    data = _event_object(data, "subscription")
    channel_data = data.get("channel_data")
    if channel_data is not None and type(channel_data) is not str:
        raise PusherError("channel_data must be a JSON string")
    return data.get("channel"), data.get("auth"), channel_data


def signin(data: Any) -> tuple[str, Any]:
    """The `user_data` (the JSON string the signature covers) and `auth` of a
    `pusher:signin`'s data, `auth` unchecked.

    Raises:
        PusherError: malformed.
    """
    data = _event_object(data, "signin")
    user_data = data.get("user_data")
    if type(user_data) is not str:
        raise PusherError("user_data must be a JSON string")
    return user_data, data.get("auth")


@dataclass(frozen=True, slots=True)
class Member:
    """A presence channel's member, from the `channel_data` the app's server signed."""

    user_id: str
    user_info: Any


def member(channel_data: str | None) -> Member:
    """Parse the signed `channel_data` of a presence subscription.

    Raises:
        PusherError: missing, not JSON, or without `user_id`.
    """
    if channel_data is None:
        raise PusherError("Presence channels need channel_data")
    try:
        data = orjson.loads(channel_data)
    except orjson.JSONDecodeError:
        raise PusherError("channel_data is not JSON") from None
    if type(data) is not dict:
        raise PusherError("channel_data must be a JSON object")
    user_id = data.get("user_id")
    # Laravel sends integers; members are keyed by their string form, as Pusher does.
    if type(user_id) is int:
        user_id = str(user_id)
    if type(user_id) is not str or not user_id:
        raise PusherError("channel_data needs a user_id")
    return Member(user_id, data.get("user_info"))


def signed_in_user(user_data: Any) -> str:
    """The id of a `pusher:signin`'s `user_data` (a JSON string with a non-empty `id`).

    Raises:
        PusherError: malformed.
    """
    if type(user_data) is not str:
        raise PusherError("user_data must be a JSON string")
    try:
        data = orjson.loads(user_data)
    except orjson.JSONDecodeError:
        raise PusherError("user_data is not JSON") from None
    user_id = data.get("id") if type(data) is dict else None
    if type(user_id) is int:
        user_id = str(user_id)
    if type(user_id) is not str or not user_id:
        raise PusherError("user_data needs a non-empty string id")
    return user_id


# The HTTP API's request signatures


def body_md5(body: bytes) -> str:
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def string_to_sign(method: str, path: str, params: Mapping[str, str]) -> str:
    """`METHOD\\nPATH\\nk=v&...`: the parameters sorted by lower-cased name, values as
    they are (not URL-escaped), `auth_signature` left out."""
    query = "&".join(
        f"{name.lower()}={value}"
        for name, value in sorted(params.items(), key=lambda item: item[0].lower())
        if name != "auth_signature"
    )
    return f"{method.upper()}\n{path}\n{query}"


def request_signature(secret: str, method: str, path: str, params: Mapping[str, str]) -> str:
    """The `auth_signature` a server library computes for a request."""
    return sign(secret, string_to_sign(method, path, params))


def check_request(
    secret: str,
    method: str,
    path: str,
    params: Mapping[str, str],
    body: bytes,
    *,
    now: float,
) -> None:
    """Check an HTTP API request as Pusher does: `auth_version` 1.0, a timestamp within
    `SIGNATURE_WINDOW` seconds, `body_md5` matching the body (required when there is a
    body, checked whenever given: the Python library sends it on GETs too), and the
    signature, compared in constant time. `params` are URL-decoded.

    Raises:
        ApiError: 401, saying which check failed.
    """
    if params.get("auth_version", "1.0") != "1.0":
        raise ApiError(401, "Unsupported auth_version")
    timestamp = params.get("auth_timestamp", "")
    try:
        skew = abs(now - int(timestamp))
    except ValueError:
        raise ApiError(401, "Missing or invalid auth_timestamp") from None
    if skew > SIGNATURE_WINDOW:
        raise ApiError(401, f"Timestamp expired: {int(skew)} s off the server's clock")
    given_md5 = params.get("body_md5")
    if (body or given_md5 is not None) and given_md5 != body_md5(body):
        raise ApiError(401, "body_md5 does not match the body")
    signature = params.get("auth_signature", "")
    if _HEX_SHA256.fullmatch(signature) is None:
        raise ApiError(401, "Missing or invalid auth_signature")
    expected = request_signature(secret, method, path, params)
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise ApiError(401, "Invalid signature")


def webhook_signature(secret: str, body: bytes) -> str:
    """`X-Pusher-Signature` of a webhook's body."""
    return sign(secret, body)
