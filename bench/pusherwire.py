"""Pusher's protocol 7 as shoal-bench speaks it: the frames its connections send, the
subscription it signs, and what it reads from the server's frames.

The bench plays both the app's server and its clients: it knows the app's secret, so it
signs its own `private-` channel subscriptions (what an app's auth endpoint does for
pusher-js) with `shoal.core.pusher.channel_auth`, the signature the server checks.
Publishers send client events on that channel, as pusher-js's `channel.trigger()` does
(Laravel Echo's `whisper()`): `data` an object. The server forwards them to every other
subscriber, never back to the sender.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from typing_extensions import TypedDict

from shoal.core import pusher

ESTABLISHED = "pusher:connection_established"
SUBSCRIBED = "pusher_internal:subscription_succeeded"
SUBSCRIPTION_ERROR = "pusher:subscription_error"
ERROR = "pusher:error"
PING = "pusher:ping"
PONG = pusher.PONG
"""A client answers `pusher:ping` with the same frame as a server does."""
EVENT = "client-bench"
"""The event name of every message a publisher sends."""


class ClientEvent(TypedDict):
    """A client event as a Pusher client sends it (and, with `data` as it was sent, as
    the channel's other subscribers get it)."""

    event: str
    channel: str
    data: Any


def client_event(channel: str, data: Any) -> ClientEvent:
    """The client event a publisher sends on `channel`, carrying `data`."""
    return {"event": EVENT, "channel": channel, "data": data}


def subscribe(key: str, secret: str, socket_id: str, channel: str) -> bytes:
    """`pusher:subscribe` to `channel`, signed for the connection `socket_id` (private
    channels need the signature; it is ignored on public ones, so the same frame serves
    both)."""
    auth = pusher.channel_auth(key, secret, socket_id, channel, None)
    return orjson.dumps({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}})


def socket_id(established: Mapping[str, Any]) -> str:
    """The `socket_id` of a `pusher:connection_established` frame (its `data` is a JSON
    string, or an object from a lenient server).

    Raises:
        ValueError: no valid `socket_id` in it.
    """
    data = established.get("data")
    if isinstance(data, str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            data = None
    found = data.get("socket_id") if isinstance(data, dict) else None
    if not pusher.valid_socket_id(found):
        raise ValueError(f"pusher:connection_established without a valid socket_id: {data!r}")
    assert isinstance(found, str)  # valid_socket_id checked it
    return found


def error(message: Mapping[str, Any]) -> tuple[int | None, str]:
    """The code (None: none) and the text of a `pusher:error` frame, whose `data` is an
    object (`{"code": 4001, "message": "..."}`), or a JSON string from some servers."""
    data = message.get("data")
    if isinstance(data, str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None, data
    if not isinstance(data, dict):
        return None, str(data)
    code = data.get("code")
    return (code if type(code) is int else None), str(data.get("message", "error"))


def check_client_event(frame: bytes) -> pusher.ClientFrame:
    """Check that `frame` is a client event a Pusher server forwards, with the server's
    own parser.

    Raises:
        ValueError: it is not (not a frame, not a `client-` event, or not on a channel
            that takes client events).
    """
    try:
        parsed = pusher.parse(frame)
        channel = pusher.channel(parsed.channel)
    except pusher.PusherError as exc:
        raise ValueError(f"not a Pusher client event: {exc}") from exc
    if not parsed.event.startswith("client-") or not channel.takes_client_events:
        raise ValueError(f"not a client event on a private channel: {frame!r}")
    return parsed
