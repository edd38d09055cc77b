"""`shoal.client.positions`, with no I/O: what the persistent client remembers of each room
that keeps a history, from the messages it reads, and what it resumes from."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.client import PersistentClient, Position
from shoal.client.positions import Positions, position_of


def joined(room: str, offset: str, epoch: str, **more: Any) -> dict[str, Any]:
    return {"type": "joined_room", "room": room, "offset": offset, "epoch": epoch, **more}


def said(offset: str, epoch: str) -> dict[str, Any]:
    return {"type": "room_message", "room": "r", "offset": offset, "epoch": epoch}


def test_a_room_keeps_the_highest_offset_of_its_epoch_by_number() -> None:
    positions = Positions()
    positions.joined(joined("r", "0-0", "e1"))
    assert positions.of("r") == Position("0-0", "e1")
    for offset in ("9-0", "10-0", "2-0"):  # "10-0" < "9-0" as strings
        positions.saw("r", said(offset, "e1"))
    assert positions.of("r") == Position("10-0", "e1")
    # Another epoch: the history was lost and counts again; its offsets replace.
    positions.saw("r", said("1-0", "e2"))
    assert positions.of("r") == Position("1-0", "e2")
    # A later joined_room further on counts; one behind does not move it back.
    positions.joined(joined("r", "7-0", "e2"))
    positions.joined(joined("r", "3-0", "e2"))
    assert positions.of("r") == Position("7-0", "e2")
    assert positions.of("elsewhere") is None


@pytest.mark.parametrize(
    "carried",
    [
        {},
        {"offset": "5-0"},
        {"epoch": "e1"},
        {"offset": 5, "epoch": "e1"},
        {"offset": "05-0", "epoch": "e1"},
        {"offset": "5-1", "epoch": "e1"},
        {"offset": "5", "epoch": "e1"},
        {"offset": "1" * 20 + "-0", "epoch": "e1"},
        {"offset": "5-0", "epoch": ""},
        {"offset": "5-0", "epoch": "e" * 65},
        {"offset": "5-0", "epoch": 7},
    ],
)
def test_a_position_the_server_would_refuse_is_not_kept(carried: dict[str, Any]) -> None:
    """Positions are sent back as `since`, which the server parses strictly: one it would
    refuse would make the rejoin fail."""
    assert position_of(carried) is None
    positions = Positions()
    positions.joined(joined("r", "4-0", "e1"))
    positions.saw("r", {"type": "room_message", "room": "r", **carried})
    assert positions.of("r") == Position("4-0", "e1")


def test_the_largest_offsets_and_epochs_the_server_takes_are_kept() -> None:
    biggest = "9" * 19 + "-0"
    assert position_of({"offset": biggest, "epoch": "e" * 64}) == Position(biggest, "e" * 64)
    assert Position(biggest, "e").number == 10**19 - 1
    assert Position("12-0", "e1").since() == {"offset": "12-0", "epoch": "e1"}


def test_a_joined_room_without_a_position_forgets_the_room() -> None:
    """The room no longer keeps a history (the server's rules changed): join it as new."""
    positions = Positions()
    positions.joined(joined("r", "4-0", "e1"))
    positions.joined({"type": "joined_room", "room": "r", "members": ["me"]})
    assert positions.of("r") is None
    assert positions.resuming("r") is None


def test_a_recovered_resume_keeps_what_the_replay_brought() -> None:
    positions = Positions()
    positions.joined(joined("r", "4-0", "e1"))
    assert positions.resuming("r") == Position("4-0", "e1")
    # The replay comes before the reply, whose offset is where the room stood at the join.
    positions.saw("r", said("5-0", "e1"))
    positions.saw("r", said("6-0", "e1"))
    positions.joined(joined("r", "5-0", "e1", recovered=True))
    assert positions.of("r") == Position("6-0", "e1")


def test_a_failed_resume_takes_the_servers_position_even_behind_the_clients() -> None:
    """`offset unknown`: the server's count went back in the same epoch (a failover to a
    replica that had not caught up). The client's offset means nothing there now: kept,
    the next resume would fail again, and messages that reuse those offsets would be
    skipped."""
    positions = Positions()
    positions.joined(joined("r", "9-0", "e1"))
    positions.resuming("r")
    reply = joined("r", "3-0", "e1", recovered=False, reason="offset unknown: ...")
    positions.joined(reply)
    assert positions.of("r") == Position("3-0", "e1")


def test_a_failed_resume_counts_what_came_before_its_reply() -> None:
    """What the room said during the join comes before the reply and is delivered: it
    must not be replayed by the next resume."""
    positions = Positions()
    positions.joined(joined("r", "9-0", "e1"))
    positions.resuming("r")
    positions.saw("r", said("3-0", "e2"))
    positions.saw("r", said("4-0", "e2"))
    positions.joined(joined("r", "3-0", "e2", recovered=False, reason="epoch changed: ..."))
    assert positions.of("r") == Position("4-0", "e2")
    # The same when the server's count went back within the epoch.
    positions.resuming("r")
    positions.saw("r", said("2-0", "e2"))
    positions.joined(joined("r", "1-0", "e2", recovered=False, reason="offset unknown: ..."))
    assert positions.of("r") == Position("2-0", "e2")


def test_forgetting_and_clearing() -> None:
    positions = Positions()
    positions.joined(joined("r", "4-0", "e1"))
    positions.joined(joined("s", "2-0", "e1"))
    positions.resuming("r")
    positions.forget("r")
    assert positions.of("r") is None and positions.of("s") == Position("2-0", "e1")
    # A reply to the join abandoned by forget() is a new join's.
    positions.saw("r", said("5-0", "e1"))
    positions.joined(joined("r", "1-0", "e1", recovered=False, reason="offset too old: ..."))
    assert positions.of("r") == Position("1-0", "e1")
    positions.clear()
    assert positions.of("r") is None and positions.of("s") is None


@pytest.mark.parametrize("seconds", [0, -1.0])
def test_ping_and_close_timeouts_must_be_positive_or_none(seconds: float) -> None:
    url = "ws://127.0.0.1:1/ws"
    with pytest.raises(ValueError, match="ping_interval must be positive seconds, or None"):
        PersistentClient(url, ping_interval=seconds)
    with pytest.raises(ValueError, match="ping_timeout must be positive seconds, or None"):
        PersistentClient(url, ping_timeout=seconds)
    with pytest.raises(ValueError, match="close_timeout must be positive seconds, or None"):
        PersistentClient(url, close_timeout=seconds)
    PersistentClient(url, ping_interval=None, ping_timeout=None, close_timeout=None)
