"""The pure protocol layer: no loop, no Redis, no sockets.

Frame encoding is checked in tests/unit/test_framing.py.
"""

from __future__ import annotations

import pytest

from shoal.core import protocol
from shoal.core.errors import ProtocolError


@pytest.mark.parametrize("raw", ["", "nope", "[1]", "1", '"x"', '{"type": 1}', "{}", b"\xff"])
def test_parse_rejects_what_is_not_a_typed_object(raw: str | bytes) -> None:
    """Only a JSON object with a string `type` is a client message."""
    with pytest.raises(ProtocolError, match="Invalid message format"):
        protocol.parse(raw)


def test_parse_and_encode() -> None:
    """JSON in, compact UTF-8 JSON out."""
    assert protocol.parse('{"type":"x","n":[1]}') == {"type": "x", "n": [1]}
    assert protocol.encode({"type": "é", "n": 1}) == '{"type":"é","n":1}'.encode()


def test_fields() -> None:
    """Names are non-empty strings of at most 256 characters; a falsy value is still a value."""
    assert protocol.name_field({"room": "r"}, "room") == "r"
    assert protocol.name_field({"room": "x" * 256}, "room") == "x" * 256
    cases: list[tuple[dict[str, object], str]] = [
        ({}, "Missing room"),
        ({"room": None}, "Missing room"),
        ({"room": ""}, "Invalid room"),
        ({"room": 3}, "Invalid room"),
        ({"room": "x" * 257}, "Invalid room"),
    ]
    for bad, message in cases:
        with pytest.raises(ProtocolError, match=message):
            protocol.name_field(bad, "room")
    assert protocol.field({"message": 0}, "message") == 0
    assert protocol.timestamp(1.5) == 1500


def nested(levels: int) -> str:
    """A message whose `data` makes the whole nest `levels` levels deep."""
    inner = levels - 1  # the message object itself is the first level
    return '{"type": "x", "data": ' + "[" * inner + "]" * inner + "}"


@pytest.mark.parametrize("as_bytes", [False, True])
def test_parse_refuses_nesting_deeper_than_the_encoder_writes_back(as_bytes: bool) -> None:
    for levels, accepted in ((protocol.MAX_DEPTH, True), (protocol.MAX_DEPTH + 1, False)):
        raw = nested(levels)
        data: str | bytes = raw.encode() if as_bytes else raw
        if accepted:
            protocol.encode(protocol.parse(data))  # and it can be written back
        else:
            with pytest.raises(ProtocolError, match="nested too deeply: at most 64 levels"):
                protocol.parse(data)


def test_parse_accepts_many_brackets_that_do_not_nest() -> None:
    """Wide data is walked, not refused: the bracket count is only a bound."""
    wide = '{"type": "x", "data": [' + ", ".join(['{"a": [1]}'] * 500) + "]}"
    assert len(protocol.parse(wide)["data"]) == 500
    # Brackets inside strings count too, and are not nesting.
    assert protocol.parse('{"type": "x", "s": "' + "[" * 500 + '"}')["type"] == "x"
