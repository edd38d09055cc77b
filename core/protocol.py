"""The wire protocol, with no I/O: message parsing, JSON and frame encoding.

Close codes and message shapes are in `shoal.core.schema`.

Nothing here awaits, touches Redis or a socket, or reads the clock. Callers pass `now`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import orjson
from websockets.frames import Frame, Opcode

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets installed without its C extension
    from websockets.utils import apply_mask

from shoal.core.errors import ProtocolError

INVALID_FORMAT = "Invalid message format"
MAX_NAME_LENGTH = 256
# Objects and arrays nested deeper are refused. The encoder writes at most 254 levels
# back (orjson): a client's data nested deeper, stored as metadata or wrapped into a
# room message or a presence reply, could be read but never sent again, and every
# `presence` that included it failed for everyone.
MAX_DEPTH = 64
TOO_DEEP = f"Message nested too deeply: at most {MAX_DEPTH} levels"
_PARSER_DEPTH_LIMIT = "depth limit exceeded"  # orjson's error when it stops at 1024 levels


def parse(raw: str | bytes) -> dict[str, Any]:
    """Decode one client text frame into a message object.

    Raises:
        ProtocolError: `INVALID_FORMAT` (not JSON, not an object, no string `type`) or
            `TOO_DEEP` (nested deeper than `MAX_DEPTH` levels, however deep).
    """
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson stops at 1024 levels, before it knows whether the rest is JSON: the
        # client nested too deeply either way, which is the error it should read.
        if exc.msg.startswith(_PARSER_DEPTH_LIMIT):
            raise ProtocolError(TOO_DEEP) from None
        raise ProtocolError(INVALID_FORMAT) from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(INVALID_FORMAT)
    # Each level takes two characters, so a short message cannot be too deep; in a longer
    # one, counting brackets (in C) bounds the depth: most messages need no walk.
    if len(raw) > 2 * MAX_DEPTH and _brackets(raw) > MAX_DEPTH and _too_deep(message):
        raise ProtocolError(TOO_DEEP)
    return message


def _brackets(raw: str | bytes) -> int:
    if isinstance(raw, bytes):
        return raw.count(b"[") + raw.count(b"{")
    return raw.count("[") + raw.count("{")


def _too_deep(value: dict[str, Any]) -> bool:
    """Whether objects and arrays nest more than `MAX_DEPTH` levels in `value`."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def encode(message: Mapping[str, Any]) -> bytes:
    """Encode a server message as compact UTF-8 JSON."""
    return orjson.dumps(message)


_TEXT_FIN = 0x80 | Opcode.TEXT
_BINARY_FIN = 0x80 | Opcode.BINARY
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def frame(payload: bytes, *, text: bool = True) -> bytes:
    """One unmasked server frame holding `payload`, ready for any connection without compression.

    Server frames are never masked (RFC 6455, 5.1), so the same bytes serve every recipient.
    Written out here rather than with websockets' `Frame.serialize()`, which builds a
    frame object, checks it and handles extensions: a fourth of the cost of an echo, for
    a header of two to ten bytes (tests/unit/test_framing.py parses every length class
    back with websockets' own parser).
    """
    head = _TEXT_FIN if text else _BINARY_FIN
    length = len(payload)
    if length < 126:
        return _SHORT.pack(head, length) + payload
    if length < 65536:
        return _MEDIUM.pack(head, 126, length) + payload
    return _LONG.pack(head, 127, length) + payload


PING_FRAME = Frame(Opcode.PING, b"shoal").serialize(mask=False)

_MASKED = 0x80
_LENGTH = 0x7F


def whole_messages(data: bytes, max_size: int) -> list[tuple[bool, bytes, int]]:
    """The client messages at the start of `data` that are each one whole, plain frame.

    Only the commonest case: a masked, final text or binary frame with no extension bit,
    at most `max_size` bytes, all in `data`. Each comes as (is text, unmasked payload,
    offset where the next frame starts). The first frame that is anything else (a
    control frame, a fragment, a frame cut by the end of `data`, one too big or not
    masked) ends the list: the caller hands the bytes from there to websockets' parser,
    which handles every case and fails the connection where RFC 6455 says so.

    Written out here because websockets' parser, a chain of generators, costs 4.2 µs a
    frame, a fourth of a chat echo; this costs 0.8 µs. tests/unit/test_whole_messages.py
    checks it against websockets' parser on every kind of frame, cut at every offset.
    """
    found: list[tuple[bool, bytes, int]] = []
    end = len(data)
    at = 0
    while end - at >= 6:
        head = data[at]
        if head not in (_TEXT_FIN, _BINARY_FIN):
            break
        length = data[at + 1]
        if not length & _MASKED:
            break
        length &= _LENGTH
        start = at + 6
        if length == 126:
            length = data[at + 2] << 8 | data[at + 3]
            start = at + 8
        elif length == 127:
            length = int.from_bytes(data[at + 2 : at + 10])
            start = at + 14
        stop = start + length
        if stop > end or length > max_size:
            break
        # Slicing bytes copies, and is still cheaper than a memoryview for small frames.
        found.append(
            (head == _TEXT_FIN, apply_mask(data[start:stop], data[start - 4 : start]), stop)
        )
        at = stop
    return found


def frames_end(data: bytes, at: int, max_size: int) -> int:
    """Where the last whole frame of `data` from offset `at` on ends, whatever its kind.

    The bytes after it begin a frame still arriving. A frame announcing more than
    `max_size` bytes counts as whole, to the end of `data`: websockets refuses it as
    soon as it reads its header.
    """
    end = len(data)
    while end - at >= 2:
        length = data[at + 1]
        start = at + (6 if length & _MASKED else 2)
        length &= _LENGTH
        if length == 126:
            if end - at < 4:
                break
            length = int.from_bytes(data[at + 2 : at + 4])
            start += 2
        elif length == 127:
            if end - at < 10:
                break
            length = int.from_bytes(data[at + 2 : at + 10])
            start += 8
        if length > max_size:
            return end
        stop = start + length
        if stop > end:
            break
        at = stop
    return at


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
