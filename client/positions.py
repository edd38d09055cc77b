"""Where the client stands in each room that keeps a history: the last offset and epoch it
saw, to rejoin with after a reconnection so that the server sends what the room said
meanwhile (docs/client.md#resuming-rooms-with-a-history).

A room with a history (`app.history` on the server) adds `"offset": "<n>-0"` and
`"epoch"` to every message it sends, where `n` counts the room's messages and the epoch
names the life of its history (a new one when Redis lost it). `joined_room` carries them
too. The client keeps, per room, the highest offset of the epoch it last saw; a message
of another epoch replaces it, since offsets of different epochs do not compare.

No I/O: `PersistentClient` feeds it the messages it reads, and asks it what to send.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# As the server parses `since` (shoal.core.history.since): a position the server would
# refuse is never kept, so a rejoin can never fail because of it.
_OFFSET = re.compile(r"(0|[1-9][0-9]{0,18})-0")
_MAX_EPOCH = 64


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client stands in a room: the offset of the last message it saw (`"0-0"`:
    none yet) in the history's epoch."""

    offset: str
    epoch: str

    @property
    def number(self) -> int:
        """The count of `offset`: messages compare by it within an epoch."""
        return int(self.offset.partition("-")[0])

    def since(self) -> dict[str, str]:
        """The `since` of a `join_room` that resumes from here."""
        return {"offset": self.offset, "epoch": self.epoch}


def position_of(message: Mapping[str, Any]) -> Position | None:
    """The position a message from the server carries; None when it carries none (a room
    without a history) or one the server would not take back."""
    offset, epoch = message.get("offset"), message.get("epoch")
    if not isinstance(offset, str) or not _OFFSET.fullmatch(offset):
        return None
    if not isinstance(epoch, str) or not 0 < len(epoch) <= _MAX_EPOCH:
        return None
    return Position(offset, epoch)


def _later(current: Position | None, seen: Position) -> Position:
    """`seen`, unless `current` is as far on or further in the same epoch."""
    if current is not None and current.epoch == seen.epoch and current.number >= seen.number:
        return current
    return seen


class Positions:
    """Each room's position, as the messages the client reads move it on."""

    def __init__(self) -> None:
        self._rooms: dict[str, Position] = {}
        # Rooms being rejoined with `since`: the furthest position among the messages that
        # came before the reply (the replay, and what the room said meanwhile).
        self._resuming: dict[str, Position | None] = {}

    def of(self, room: str) -> Position | None:
        return self._rooms.get(room)

    def saw(self, room: str, message: Mapping[str, Any]) -> None:
        """A message of `room` arrived (live or replayed): move its position on."""
        seen = position_of(message)
        if seen is None:
            return
        self._rooms[room] = _later(self._rooms.get(room), seen)
        if room in self._resuming:
            self._resuming[room] = _later(self._resuming[room], seen)

    def resuming(self, room: str) -> Position | None:
        """A `join_room` for `room` goes out: the position to send as its `since` (None:
        none known; join as new). The caller must then pass the reply to `joined()`."""
        position = self._rooms.get(room)
        if position is not None:
            self._resuming[room] = None
        return position

    def joined(self, reply: Mapping[str, Any]) -> None:
        """`joined_room` arrived.

        With `recovered: false` the server's position replaces the client's: the client's
        may be ahead of it (`offset unknown`: the server's count went back, as after a
        failover to a replica that had not caught up), and then means nothing. What came
        before the reply in this join is counted, so none of it is replayed again later.
        A reply without a position forgets the room's: it keeps no history now.
        """
        room = str(reply.get("room"))
        during = self._resuming.pop(room, None)
        position = position_of(reply)
        if position is None:
            self._rooms.pop(room, None)
        elif reply.get("recovered") is False:
            self._rooms[room] = _later(during, position)
        else:
            self._rooms[room] = _later(self._rooms.get(room), position)

    def forget(self, room: str) -> None:
        """The client left `room`: a later join is a new one, with nothing to catch up."""
        self._rooms.pop(room, None)
        self._resuming.pop(room, None)

    def clear(self) -> None:
        self._rooms.clear()
        self._resuming.clear()
