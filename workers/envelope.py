"""What travels on the bus: small msgpack envelopes, packed and unpacked with no I/O.

- A message: `(text, payload, target)`: `text` says the frame kind; `payload` is the
  encoded message; `target` is the connection to leave out (room, channel and global
  channels) or the list of recipient connections (a worker's own channel).
- Departures: `("departed", [[user_id, [room, ...]], ...], None)`, sent to one worker's
  channel after a cleanup removed connections of a worker that died, so that the
  application can tell their rooms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgpack

DEPARTED = "departed"


def message(payload: bytes, target: str | list[str] | None, *, text: bool = True) -> bytes:
    return msgpack.packb((text, payload, target))


def departures(departed: Iterable[tuple[str, Sequence[str]]]) -> bytes:
    return msgpack.packb((DEPARTED, [[user, list(rooms)] for user, rooms in departed], None))


def unpack(data: bytes) -> tuple[Any, Any, Any]:
    """Unpack either envelope. A message's first item is a bool, a notice's a str."""
    kind, body, target = msgpack.unpackb(data)
    return kind, body, target
