"""Shared memory between the master and its workers: who is up, how busy, how alive.

The master allocates it before forking; each worker writes only its own slot, so no lock
is needed. Reads that sum over slots (connections on this node) may be a moment stale,
which is the accepted price: the `max_connection` check may admit up to `worker_num - 1`
connections too many when handshakes race on different workers.
"""

from __future__ import annotations

import ctypes
from multiprocessing.sharedctypes import RawArray
from typing import Any


class Scoreboard:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._pid: Any = RawArray(ctypes.c_int64, slots)
        self._ready: Any = RawArray(ctypes.c_int8, slots)
        self._beat: Any = RawArray(ctypes.c_double, slots)
        self._connections: Any = RawArray(ctypes.c_int64, slots)

    def claim(self, slot: int, pid: int, now: float) -> None:
        """Master: a new worker process owns `slot`."""
        self._pid[slot] = pid
        self._ready[slot] = 0
        self._beat[slot] = now
        self._connections[slot] = 0

    def release(self, slot: int) -> None:
        """Master: the worker in `slot` is gone."""
        self._pid[slot] = 0
        self._ready[slot] = 0
        self._connections[slot] = 0

    def pid(self, slot: int) -> int:
        return int(self._pid[slot])

    def set_ready(self, slot: int) -> None:
        self._ready[slot] = 1

    def is_ready(self, slot: int) -> bool:
        return bool(self._ready[slot])

    def beat(self, slot: int, now: float) -> None:
        """Worker: my event loop is running (`now` from `time.monotonic()`)."""
        self._beat[slot] = now

    def last_beat(self, slot: int) -> float:
        return float(self._beat[slot])

    def set_connections(self, slot: int, count: int) -> None:
        self._connections[slot] = count

    def connections(self) -> int:
        """Open connections on this node, all workers together."""
        return int(sum(self._connections))

    def workers_alive(self) -> int:
        return sum(1 for slot in range(self.slots) if self._pid[slot] and self._ready[slot])
