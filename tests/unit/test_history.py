"""Room history's pure parts: which rooms keep one, and whether a client is caught up."""

from __future__ import annotations

import pytest

from shoal.core import history
from shoal.core.history import Position, Rule, Rules, Since
from shoal.core.keys import Keys


def test_the_first_matching_rule_applies_and_others_keep_nothing() -> None:
    rules = Rules([Rule("orders.vip.*", 10, 60), Rule("orders.*", 1000, 300)])
    assert rules.of("orders.vip.1") == Rule("orders.vip.*", 10, 60)
    assert rules.of("orders.7") == Rule("orders.*", 1000, 300)
    assert rules.of("lobby") is None
    assert not Rules() and rules


@pytest.mark.parametrize(
    ("since", "position", "first", "reason"),
    [
        (Since("e", "4-0"), Position("e", "9-0"), "5-0", None),  # the next one is kept
        (Since("e", "9-0"), Position("e", "9-0"), None, None),  # nothing said since
        (Since("e", "0-0"), Position("e", "3-0"), "1-0", None),  # joined an empty room
        (Since("e", "4-0"), Position("e", "9-0"), "7-0", "offset too old"),  # trimmed
        (Since("e", "4-0"), Position("e", "9-0"), None, "offset too old"),  # expired
        (Since("old", "4-0"), Position("new", "9-0"), "5-0", "epoch changed"),
        (Since("e", "12-0"), Position("e", "9-0"), None, "offset unknown"),
    ],
)
def test_a_client_is_caught_up_only_when_nothing_after_its_offset_is_missing(
    since: Since, position: Position, first: str | None, reason: str | None
) -> None:
    said = history.recovered(since, position, first)
    assert said == reason if reason is None else said is not None and said.startswith(reason)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "1-0",
        {"offset": "1-0"},
        {"offset": "x", "epoch": "e"},
        {"offset": "01-0", "epoch": "e"},
        {"offset": "1-1", "epoch": "e"},
        {"offset": "1-0", "epoch": ""},
        {"offset": "1-0", "epoch": 5},
        {"offset": "1-0", "epoch": "e" * 65},
    ],
)
def test_a_malformed_since_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="since"):
        history.since(value)


def test_since_parses_and_replayed_payloads_are_the_live_bytes() -> None:
    assert history.since({"offset": "12-0", "epoch": "ab"}) == Since("ab", "12-0")
    assert history.since({"offset": "0-0", "epoch": "ab"}) == Since("ab", "0-0")
    head = b'{"type":"room_message","message":"hi"'
    live = head + b',"offset":"7-0","epoch":"ab"}'
    assert history.payloads([["7-0", ["m", head.decode()]]], "ab") == [("7-0", live)]
    assert history.offset_of(live) == 7
    assert history.offset_of(b'{"type":"user_left_room"}') is None
    assert history.replay(Keys("p"), "r", "7-0")[2:] == ("(7-0", "+")
    assert history.replay(Keys("p"), "r", "0-0")[2:] == ("-", "+")
