"""The scoreboard in shared memory, used here within one process: seats, counts, codes."""

from __future__ import annotations

import pytest

from shoal.core.scoreboard import Scoreboard


def test_seats_are_claimed_and_released() -> None:
    """free_seat() gives the lowest seat nobody holds; a released seat is free again."""
    board = Scoreboard(3)
    assert board.free_seat() == 0
    board.claim(0, 1001, 10.0, serving=True)
    assert board.free_seat() == 1
    board.claim(1, 1002, 10.0, serving=True)
    board.claim(2, 1003, 10.0, serving=False)
    with pytest.raises(RuntimeError, match="scoreboard full"):
        board.free_seat()
    board.release(1)
    assert board.free_seat() == 1


def test_claim_starts_a_seat_afresh() -> None:
    """A new child in a used seat inherits nothing: not ready, no connections, no code,
    and its heartbeat is the claim's time."""
    board = Scoreboard(1)
    board.claim(0, 1001, 5.0, serving=True)
    board.set_ready(0)
    board.set_connections(0, 40)
    board.set_close_code(0, 1012)
    board.beat(0, 9.0)
    board.release(0)
    board.claim(0, 1002, 20.0, serving=True)
    assert not board.is_ready(0)
    assert board.connections() == 0
    assert board.close_code(0) == 0
    assert board.last_beat(0) == 20.0


def test_connections_are_summed_over_seats() -> None:
    """The node's connections are every seat's together; a released seat counts none."""
    board = Scoreboard(4)
    assert board.connections() == 0
    for seat, count in enumerate((3, 0, 7)):
        board.claim(seat, 100 + seat, 0.0, serving=True)
        board.set_connections(seat, count)
    assert board.connections() == 10
    board.set_connections(2, 5)
    assert board.connections() == 8
    board.release(0)
    assert board.connections() == 5


def test_workers_alive_counts_ready_serving_seats_only() -> None:
    """A child counts as a live worker once it is ready, serves clients, and holds a seat."""
    board = Scoreboard(5)
    board.claim(0, 100, 0.0, serving=True)
    board.claim(1, 101, 0.0, serving=True)
    board.claim(2, 102, 0.0, serving=False)  # the housekeeper
    board.claim(3, 103, 0.0, serving=True)
    assert board.workers_alive() == 0  # none has finished starting
    for seat in (0, 1, 2):
        board.set_ready(seat)
    assert board.workers_alive() == 2
    board.release(1)
    assert board.workers_alive() == 1
    board.set_ready(4)  # a seat nobody holds cannot be alive
    assert board.workers_alive() == 1


def test_heartbeats_and_close_codes_are_per_seat() -> None:
    """Each child beats its own seat; the master's close code reaches one child only."""
    board = Scoreboard(2)
    board.claim(0, 100, 1.0, serving=True)
    board.claim(1, 101, 1.0, serving=True)
    board.beat(0, 7.5)
    assert (board.last_beat(0), board.last_beat(1)) == (7.5, 1.0)
    assert (board.close_code(0), board.close_code(1)) == (0, 0)
    board.set_close_code(1, 1001)
    assert (board.close_code(0), board.close_code(1)) == (0, 1001)
