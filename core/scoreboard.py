"""Shared memory between the master and its children: who is up, how busy, how alive.

The master allocates it before forking, with one seat per child it may run at once (a
rolling reload runs an old and a new worker side by side, so there are more seats than
workers). Each child writes only its own seat, so no lock is needed; sums over seats
(connections on this node) may be a moment stale.

The master writes one thing into a child's seat: how it is to stop (the close code its
clients get, 1001 for a stop, 1012 when it is replaced; whether it drains its listener
first), before it signals it.
"""

from __future__ import annotations

import ctypes
from multiprocessing.sharedctypes import RawArray
from typing import Any

from shoal.core.metrics import Metrics


class Scoreboard:
    def __init__(self, seats: int) -> None:
        self.seats = seats
        self._pid: Any = RawArray(ctypes.c_int64, seats)
        self._ready: Any = RawArray(ctypes.c_int8, seats)
        self._serving: Any = RawArray(ctypes.c_int8, seats)
        self._beat: Any = RawArray(ctypes.c_double, seats)
        self._connections: Any = RawArray(ctypes.c_int64, seats)
        self._close_code: Any = RawArray(ctypes.c_int32, seats)
        self._drain: Any = RawArray(ctypes.c_int8, seats)
        self._recycle: Any = RawArray(ctypes.c_int8, seats)
        self._redis_up: Any = RawArray(ctypes.c_int8, seats)
        self.metrics = Metrics(seats)  # the children's counters (`shoal.core.metrics`)

    def claim(self, seat: int, pid: int, now: float, *, serving: bool) -> None:
        """Master: a new child process owns `seat`.

        Args:
            serving: the child serves WebSocket clients (it counts in `workers_alive`).
        """
        self._pid[seat] = pid
        self._ready[seat] = 0
        self._serving[seat] = int(serving)
        self._beat[seat] = now
        self._connections[seat] = 0
        self._close_code[seat] = 0
        self._drain[seat] = 0
        self._recycle[seat] = 0
        self._redis_up[seat] = 0

    def release(self, seat: int) -> None:
        """Master: the child in `seat` is gone (its counters go to the retired row)."""
        self.metrics.fold(seat)
        self._pid[seat] = 0
        self._ready[seat] = 0
        self._serving[seat] = 0
        self._connections[seat] = 0

    def free_seat(self) -> int:
        """Master: a seat no child holds.

        Raises:
            RuntimeError: every seat is taken (the master sized the board too small).
        """
        for seat in range(self.seats):
            if not self._pid[seat]:
                return seat
        raise RuntimeError("scoreboard full")

    def set_ready(self, seat: int) -> None:
        """Child: I finished starting."""
        self._ready[seat] = 1

    def is_ready(self, seat: int) -> bool:
        return bool(self._ready[seat])

    def beat(self, seat: int, now: float) -> None:
        """Child: my event loop is running (`now` from `time.monotonic()`)."""
        self._beat[seat] = now

    def last_beat(self, seat: int) -> float:
        return float(self._beat[seat])

    def set_connections(self, seat: int, count: int) -> None:
        self._connections[seat] = count

    def connections_of(self, seat: int) -> int:
        return int(self._connections[seat])

    def connections(self) -> int:
        """Connections admitted on this node, all workers together."""
        return int(sum(self._connections))

    def set_close_code(self, seat: int, code: int) -> None:
        """Master: what the child in `seat` closes its clients with when told to stop."""
        self._close_code[seat] = code

    def close_code(self, seat: int) -> int:
        """Child: the close code the master asked for; 0 when it asked for none."""
        return int(self._close_code[seat])

    def retire(self, seat: int, code: int, *, drain: bool) -> None:
        """Master: the child in `seat` is replaced or its slot removed; it no longer
        counts as serving. `drain`: it is the last holder of its listener."""
        self._close_code[seat] = code
        self._drain[seat] = int(drain)
        self._serving[seat] = 0

    def drain(self, seat: int) -> bool:
        """Child: accept what my listener holds before closing it."""
        return bool(self._drain[seat])

    def set_redis_up(self, seat: int, up: bool) -> None:
        """Child: whether Redis answers me."""
        self._redis_up[seat] = int(up)

    def redis_up(self, seat: int) -> bool:
        return bool(self._redis_up[seat])

    def redis_up_everywhere(self) -> bool:
        """Every serving worker of this node last said Redis answers it."""
        return all(
            self._redis_up[seat]
            for seat in range(self.seats)
            if self._pid[seat] and self._ready[seat] and self._serving[seat]
        )

    def request_recycle(self, seat: int) -> None:
        """Child: replace me (I reached `server.max_request`)."""
        self._recycle[seat] = 1

    def recycle_requested(self, seat: int) -> bool:
        return bool(self._recycle[seat])

    def workers_alive(self) -> int:
        """WebSocket workers of this node that are running and finished starting."""
        return sum(
            1
            for seat in range(self.seats)
            if self._pid[seat] and self._ready[seat] and self._serving[seat]
        )
