"""The wire protocol, with no I/O: message parsing, JSON and frame encoding.

Close codes and message shapes are in `shoal.core.schema`.

Nothing here awaits, touches Redis or a socket, or reads the clock. Callers pass `now`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from websockets.frames import Frame, Opcode

from shoal.core.errors import ProtocolError

INVALID_FORMAT = "Invalid message format"
MAX_NAME_LENGTH = 256


def parse(raw: str | bytes) -> dict[str, Any]:
    """Decode one client text frame into a message object.

    Raises:
        ProtocolError: not JSON, not an object, or no string `type`.
    """
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError(INVALID_FORMAT) from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(INVALID_FORMAT)
    return message


def encode(message: Mapping[str, Any]) -> bytes:
    """Encode a server message as compact UTF-8 JSON."""
    return orjson.dumps(message)


def frame(payload: bytes, *, text: bool = True) -> bytes:
    """One unmasked server frame holding `payload`, ready for any connection without compression.

    Server frames are never masked (RFC 6455, 5.1), so the same bytes serve every recipient.
    """
    return Frame(Opcode.TEXT if text else Opcode.BINARY, payload).serialize(mask=False)


PING_FRAME = Frame(Opcode.PING, b"shoal").serialize(mask=False)


def timestamp(now: float) -> int:
    """Protocol timestamps are integer milliseconds since the epoch."""
    return int(now * 1000)


def field(message: Mapping[str, Any], name: str) -> Any:
    """The value of a required field.

    Raises:
        ProtocolError: "Missing <name>" when absent or null.
    """
    value = message.get(name)
    if value is None:
        raise ProtocolError(f"Missing {name}")
    return value


def name_field(message: Mapping[str, Any], name: str) -> str:
    """A required room, channel or user name: a non-empty string of at most 256 characters.

    Raises:
        ProtocolError: "Missing <name>" or "Invalid <name>".
    """
    value = field(message, name)
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        raise ProtocolError(f"Invalid {name}")
    return value
