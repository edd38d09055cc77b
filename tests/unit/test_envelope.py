"""Bus envelopes: what one worker packs, another unpacks exactly; anything else is an
`EnvelopeError`, never a crash of the receiver."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from shoal.core import envelope
from shoal.core.envelope import Departed, Disconnect, Message
from shoal.core.errors import EnvelopeError


@pytest.mark.parametrize(
    ("payload", "text", "target"),
    [
        (b'{"type":"x"}', True, None),
        (b'{"type":"x"}', True, "n1.0.1.7"),
        ("é".encode(), True, ["n1.0.1.7", "n1.0.1.8"]),
        (b"\x00\x01\xff", False, None),
        (b"\x00\x01\xff", False, "n1.0.1.7"),
        (b"", False, []),
        (bytes(range(256)) * 300, False, ["a"]),  # larger than any msgpack short form
    ],
)
def test_message_round_trip(payload: bytes, text: bool, target: str | list[str] | None) -> None:
    """A message comes back with the same frame kind, payload bytes and target."""
    unpacked = envelope.unpack(envelope.message(payload, target, text=text))
    assert type(unpacked) is Message
    assert unpacked == Message(text, payload, target)
    assert type(unpacked.payload) is bytes and type(unpacked.text) is bool


def test_message_is_text_unless_told() -> None:
    """Text frames are the default, as for JSON client messages."""
    assert envelope.unpack(envelope.message(b"{}", None)) == Message(True, b"{}", None)


def test_departed_round_trip() -> None:
    """Departed users come back with their rooms, in order, rooms as lists."""
    users = [("ann", ("lobby", "r2")), ("bo", []), ("é", ["x"])]
    assert envelope.unpack(envelope.departed(users)) == Departed(
        [("ann", ["lobby", "r2"]), ("bo", []), ("é", ["x"])]
    )
    assert envelope.unpack(envelope.departed([])) == Departed([])


def test_disconnect_round_trip() -> None:
    """A kick or ban: the notice, the close code and reason, the connections."""
    packed = envelope.disconnect(b'{"type":"kicked"}', 4003, "kicked", ["n1.0.1.7"])
    assert envelope.unpack(packed) == Disconnect(b'{"type":"kicked"}', 4003, "kicked", ["n1.0.1.7"])
    assert msgpack.unpackb(packed) == [1, 4, b'{"type":"kicked"}', 4003, "kicked", ["n1.0.1.7"]]


def test_the_wire_format_is_the_documented_array() -> None:
    """`[1, 1, text, payload, target]` and `[1, 2, [[user, [room, ...]], ...]]`: other
    nodes of this version decode exactly these, so they must not drift."""
    assert msgpack.unpackb(envelope.message(b"p", "c", text=False)) == [1, 1, False, b"p", "c"]
    assert msgpack.unpackb(envelope.departed([("u", ["r"])])) == [1, 2, [["u", ["r"]]]]


@pytest.mark.parametrize("version", [0, 2, 99, "1", None])
def test_unknown_version_is_refused(version: Any) -> None:
    """A newer (or older) node's envelope is refused by version before anything else."""
    data = msgpack.packb([version, 1, True, b"x", None])
    with pytest.raises(EnvelopeError, match="unknown version"):
        envelope.unpack(data)


@pytest.mark.parametrize("kind", [0, 5, "1", None])
def test_unknown_kind_is_refused(kind: Any) -> None:
    """A kind this version does not know is refused, not guessed at."""
    with pytest.raises(EnvelopeError, match="unknown kind"):
        envelope.unpack(msgpack.packb([1, kind, True, b"x", None]))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x95\x01\x01",  # an array cut short
        b"\x01",  # an integer, not an array
        b"\x80",  # an empty map
        b"\x91\x01",  # [1]: no kind
        b"\x91" * 2000,  # nested deeper than msgpack allows
        b"not msgpack at all",
    ],
    ids=["empty", "unused-byte", "truncated", "integer", "map", "no-kind", "deep", "text"],
)
def test_garbage_is_refused(data: bytes) -> None:
    """Bytes that are not an envelope raise EnvelopeError, with the cause chained."""
    with pytest.raises(EnvelopeError):
        envelope.unpack(data)


def test_trailing_bytes_are_refused() -> None:
    """An envelope with bytes after it is not one envelope."""
    with pytest.raises(EnvelopeError, match="not a bus envelope"):
        envelope.unpack(envelope.message(b"x", None) + b"\x00")


@pytest.mark.parametrize(
    "body",
    [
        [1, 1, True, b"x"],
        [1, 1, True, b"x", None, "extra"],
        [1, 2],
        [1, 2, 5],
        [1, 2, [["ann"]]],
        [1, 2, [["ann", ["r"], "extra"]]],
        # Decodable msgpack, with a value of the wrong type where the format has a field:
        [1, 1, True, 5, None],
        [1, 1, "yes", b"x", None],
        [1, 1, True, b"x", 5],
        [1, 2, [["ann", "lobby"]]],
        [1, 4, b"x", 999, "kicked", ["c"]],
        [1, 4, b"x", 4003, "kicked", "c"],
    ],
    ids=[
        "message-too-short",
        "message-too-long",
        "departed-no-users",
        "users-not-a-list",
        "user-without-rooms",
        "user-with-extra",
        "payload-int",
        "text-not-bool",
        "target-int",
        "rooms-a-string",
        "close-code-out-of-range",
        "disconnect-target-a-string",
    ],
)
def test_malformed_body_is_refused(body: list[Any]) -> None:
    """An envelope of a known version and kind whose fields do not fit the format."""
    with pytest.raises(EnvelopeError, match="malformed bus envelope"):
        envelope.unpack(msgpack.packb(body))
