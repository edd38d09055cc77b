"""The transport's fast path for client frames, checked against websockets' own parser.

`protocol.whole_messages` must return exactly the leading frames of a read that
websockets would turn into whole text or binary messages, with the same payloads, and
stop at the first frame it leaves to websockets, wherever the read is cut.
"""

from __future__ import annotations

import random

import pytest
from websockets.frames import Frame, Opcode

from shoal.core import protocol

from support import websockets_frames

MAX_SIZE = 70_000


def client_frame(
    opcode: Opcode, data: bytes, *, fin: bool = True, rsv1: bool = False, mask: bool = True
) -> bytes:
    """A frame as a client sends it (masked, with a random key), serialized by websockets;
    `rsv1` sets the extension bit websockets itself refuses to write without an extension."""
    wire = Frame(opcode, data, fin).serialize(mask=mask)
    return bytes([wire[0] | 0x40]) + wire[1:] if rsv1 else wire


def fast_path_prefix(wire: bytes) -> list[tuple[bool, bytes, int]]:
    """What the fast path should return: websockets' leading plain whole messages."""
    expected = []
    for frame, stop in websockets_frames(wire, MAX_SIZE):
        plain = frame.fin and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
        if not plain or frame.opcode not in (Opcode.TEXT, Opcode.BINARY):
            break
        expected.append((frame.opcode is Opcode.TEXT, bytes(frame.data), stop))
    return expected


SIZES = [0, 1, 5, 125, 126, 127, 65535, 65536]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_every_length_encoding(size: int, opcode: Opcode) -> None:
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    wire = client_frame(opcode, payload) * 2
    found = protocol.whole_messages(wire, MAX_SIZE)
    half = len(wire) // 2
    assert found == [
        (opcode is Opcode.TEXT, payload, half),
        (opcode is Opcode.TEXT, payload, len(wire)),
    ]
    assert found == fast_path_prefix(wire)


@pytest.mark.parametrize(
    ("name", "other"),
    [
        ("ping", client_frame(Opcode.PING, b"p")),
        ("pong", client_frame(Opcode.PONG, b"")),
        ("close", client_frame(Opcode.CLOSE, b"\x03\xe8")),
        ("first fragment", client_frame(Opcode.TEXT, b"a", fin=False)),
        ("continuation", client_frame(Opcode.CONT, b"a")),
        ("compressed (RSV1)", client_frame(Opcode.TEXT, b"a", rsv1=True)),
        ("unmasked", client_frame(Opcode.TEXT, b"a", mask=False)),
        ("over max_size", client_frame(Opcode.BINARY, b"x" * (MAX_SIZE + 1))),
        ("reserved opcode", b"\x83\x80abcd"),
    ],
)
def test_stops_at_the_first_frame_websockets_must_handle(name: str, other: bytes) -> None:
    first = client_frame(Opcode.TEXT, b'{"type":"a"}')
    after = client_frame(Opcode.TEXT, b'{"type":"b"}')
    wire = first + other + after
    assert protocol.whole_messages(wire, MAX_SIZE) == [(True, b'{"type":"a"}', len(first))], name


def test_agrees_with_websockets_on_random_streams_cut_anywhere() -> None:
    """Random mixes of every frame kind, each cut at every offset of its last frames."""
    rng = random.Random(6455)
    kinds = [
        lambda d: client_frame(Opcode.TEXT, d),
        lambda d: client_frame(Opcode.BINARY, d),
        lambda d: client_frame(Opcode.TEXT, d, fin=False),
        lambda d: client_frame(Opcode.PING, d[:125]),
        lambda d: client_frame(Opcode.TEXT, d, rsv1=True),
        lambda d: client_frame(Opcode.BINARY, d, mask=False),
    ]
    weights = [8, 4, 1, 1, 1, 1]
    for _ in range(200):
        frames = []
        for _ in range(rng.randint(1, 6)):
            size = rng.choice([0, 3, 60, 125, 126, 300, 70_001])
            data = rng.randbytes(size)
            frames.append(rng.choices(kinds, weights)[0](data))
        wire = b"".join(frames)
        assert protocol.whole_messages(wire, MAX_SIZE) == fast_path_prefix(wire)
        # Cut anywhere in the last frame: it is never returned half.
        last_start = len(wire) - len(frames[-1])
        for cut in range(last_start, len(wire), max(1, len(frames[-1]) // 40)):
            assert protocol.whole_messages(wire[:cut], MAX_SIZE) == fast_path_prefix(wire[:cut])
