"""The pure protocol layer: no loop, no Redis, no sockets."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from shoal.core import protocol
from shoal.core.errors import ProtocolError


@pytest.mark.parametrize("raw", ["", "nope", "[1]", "1", '"x"', '{"type": 1}', "{}", b"\xff"])
def test_parse_rejects_what_is_not_a_typed_object(raw: str | bytes) -> None:
    with pytest.raises(ProtocolError, match="Invalid message format"):
        protocol.parse(raw)


def test_parse_and_encode() -> None:
    assert protocol.parse('{"type":"x","n":[1]}') == {"type": "x", "n": [1]}
    assert protocol.encode({"type": "é", "n": 1}) == '{"type":"é","n":1}'.encode()


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_frames_are_unmasked_and_parse_back(size: int) -> None:
    payload = b"x" * size
    wire = protocol.frame(payload)
    assert wire[1] & 0x80 == 0  # server frames are never masked
    assert wire.endswith(payload)
    binary = protocol.frame(payload, text=False)
    assert binary[0] == 0x80 | Opcode.BINARY
    assert wire[0] == 0x80 | Opcode.TEXT


def test_ping_frame() -> None:
    assert Frame(Opcode.PING, b"shoal").serialize(mask=False) == protocol.PING_FRAME


def test_fields() -> None:
    assert protocol.name_field({"room": "r"}, "room") == "r"
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
