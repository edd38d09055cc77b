"""What both clients share: how a value goes on the wire, the handshake's headers, and the
translation of websockets' exceptions into the client's error tree (in one place)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from typing import Any

from websockets.exceptions import (
    ConnectionClosed as WebSocketClosed,
)
from websockets.exceptions import (
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.frames import CloseCode

from shoal.client.errors import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionClosed,
    HandshakeRefused,
    ProtocolError,
)

Data = str | bytes
"""A message as it travels: text, or binary."""

# Codes websockets closes with itself when the server breaks the WebSocket protocol.
_BROKEN_BY_PEER = (CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_DATA)


def encode(data: Any) -> Data:
    """The frame for `data`: a str goes as text, bytes-like as binary, a dict or a list
    as compact JSON text.

    Raises:
        TypeError: any other type, or a dict or list that JSON cannot encode.
    """
    if isinstance(data, str):
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if isinstance(data, dict | list):
        try:
            return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        except ValueError as exc:  # a circular reference
            raise TypeError(f"cannot send as JSON: {exc}") from exc
    raise TypeError(f"cannot send {type(data).__name__}: send str, bytes, a dict or a list")


def decode_json(raw: Data) -> Any:
    """The JSON value of a text message.

    Raises:
        ProtocolError: a binary message, or text that is not JSON.
    """
    if not isinstance(raw, str):
        raise ProtocolError(f"expected a JSON text message, got {len(raw)} binary bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"the server sent text that is not JSON: {raw[:80]!r}") from exc


# Fields a request and its reply both carry, with the same value (`join_room` and
# `joined_room` name the room, `private` and `message_sent` the user, ...).
_ECHOED = ("room", "channel", "to", "user_id", "task_id")


def answers(request: Mapping[str, Any], reply: Mapping[str, Any]) -> bool:
    """Whether `reply` may answer `request`: the fields both carry agree. (The type is
    the caller's to check.)"""
    return all(request[key] == reply[key] for key in _ECHOED if key in request and key in reply)


def handshake_headers(headers: Mapping[str, str] | None, token: str | None) -> dict[str, str]:
    """The extra request headers: the caller's, and `Authorization: Bearer <token>`
    (shoal reads the token there as well as in the `token` query parameter)."""
    result = dict(headers or {})
    if token is not None:
        result["Authorization"] = f"Bearer {token}"
    return result


def check_url(url: str, context: ssl.SSLContext | None) -> None:
    """Refuse, before any I/O, what can never connect.

    Raises:
        ValueError: not a ws:// or wss:// URL, or a TLS context with a ws:// URL.
    """
    if not url.startswith(("ws://", "wss://")):
        raise ValueError(f"not a WebSocket URL (ws:// or wss://): {url!r}")
    if context is not None and url.startswith("ws://"):
        raise ValueError("ssl= was given for a ws:// URL: use wss://")


def connect_failed(url: str, exc: BaseException) -> ConnectFailed:
    """The client error for an exception raised while opening a connection.

    The caller raises it `from exc`.
    """
    if isinstance(exc, InvalidStatus):
        response = exc.response
        reason = response.reason_phrase
        body = bytes(response.body or b"")
        try:
            decoded = json.loads(body)
            reason = str(decoded.get("reason") or decoded.get("error") or reason)
        except (ValueError, AttributeError):
            if body.strip():
                reason = body.decode(errors="replace").strip()[:200]
        kind = AuthenticationFailed if response.status_code == 401 else HandshakeRefused
        return kind(url, response.status_code, reason, retry_after(response.headers))
    if isinstance(exc, InvalidURI):
        return ConnectFailed(url, f"invalid URL: {exc}")
    if isinstance(exc, TimeoutError):
        return ConnectFailed(url, "no WebSocket handshake within the timeout")
    if isinstance(exc, InvalidHandshake | OSError | EOFError):
        return ConnectFailed(url, str(exc) or type(exc).__name__)
    return ConnectFailed(url, repr(exc))


def retry_after(headers: Any) -> float | None:
    """`Retry-After` in seconds, when it is a number (shoal sends seconds)."""
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def closed(exc: WebSocketClosed) -> ConnectionClosed | ProtocolError:
    """The client error for websockets' `ConnectionClosed`: `ProtocolError` when this end
    closed because the server broke the protocol, else `ConnectionClosed` with the code
    the server sent (1006 when none)."""
    if exc.rcvd is None and exc.sent is not None and exc.sent.code in _BROKEN_BY_PEER:
        return ProtocolError(f"the server broke the WebSocket protocol: {exc.sent.reason}")
    code, reason = close_of(exc)
    return ConnectionClosed(code, reason)


def close_of(exc: WebSocketClosed) -> tuple[int, str]:
    """The close code and reason as the server gave them; 1006 (abnormal closure) when no
    close frame came, as the WebSocket spec reports it."""
    if exc.rcvd is not None:
        return int(exc.rcvd.code), exc.rcvd.reason
    return int(CloseCode.ABNORMAL_CLOSURE), ""
