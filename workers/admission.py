"""Admission: a connection counts against `server.max_connection` from its handshake on.

Counting only registered connections let a burst through: every handshake in flight
read the same count until its Redis round trip finished (80 of 80 admitted with a limit
of 50). Here a connection is counted the moment it is admitted, before anything awaits,
and released when its transport is gone, whatever happened in between.

Each worker writes only its own seat of the node's scoreboard and admits against the
sum over every seat, so the limit holds across the node's workers. The sum is read
without a lock: two workers admitting in the same microsecond can each pass, so the
node may exceed the limit by at most `worker_num - 1`.
"""

from __future__ import annotations

from shoal.core.scoreboard import Scoreboard


class Admission:
    """The connection count of one worker, and the node-wide limit.

    Args:
        scoreboard: the node's shared scoreboard.
        seat: this worker's seat on it.
        limit: `server.max_connection`.
    """

    def __init__(self, scoreboard: Scoreboard, seat: int, limit: int) -> None:
        self.scoreboard = scoreboard
        self.seat = seat
        self.limit = limit
        self.count = 0

    def admit(self) -> bool:
        """Count one more connection, unless the node is full. True if admitted."""
        if self.scoreboard.connections() >= self.limit:
            return False
        self.count += 1
        self.scoreboard.set_connections(self.seat, self.count)
        return True

    def release(self) -> None:
        """An admitted connection is gone."""
        self.count -= 1
        self.scoreboard.set_connections(self.seat, self.count)
