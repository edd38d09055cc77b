"""Server frames built once and shared by every recipient, checked against websockets' own
frame parser (an independent implementation of RFC 6455), for every length encoding."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from shoal.core import protocol


def parse(wire: bytes) -> Frame:
    """Parse one server frame with websockets; the bytes must hold it exactly."""
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)  # refuses a masked frame
    with pytest.raises(StopIteration) as done:
        next(parser)
    assert reader.buffer == b"", "bytes left after the frame"
    frame: Frame = done.value.value
    return frame


def payload_of(size: int) -> bytes:
    """`size` bytes of valid ASCII that differ from one position to the next."""
    return bytes(48 + (i * 7) % 75 for i in range(size))


# RFC 6455, 5.2: a length up to 125 fits the 7-bit field; up to 65535, 126 and 2 bytes
# follow; beyond, 127 and 8 bytes. The header is 2, 4 or 10 bytes long (no mask key).
LENGTHS = [
    (0, 2),
    (1, 2),
    (125, 2),
    (126, 4),
    (65535, 4),
    (65536, 10),
    (5 * 2**20 + 3, 10),
]


@pytest.mark.parametrize(("size", "header"), LENGTHS)
@pytest.mark.parametrize(("text", "opcode"), [(True, Opcode.TEXT), (False, Opcode.BINARY)])
def test_frame_parses_back_exactly(size: int, header: int, text: bool, opcode: Opcode) -> None:
    """Opcode, FIN, no mask, the shortest length encoding and the exact payload."""
    payload = payload_of(size)
    wire = protocol.frame(payload, text=text)
    assert len(wire) == header + size
    assert wire[1] & 0x80 == 0  # server frames are never masked (RFC 6455, 5.1)
    assert wire[0] & 0x70 == 0  # no extension bits: these frames go to uncompressed peers
    frame = parse(wire)
    assert frame.opcode is opcode
    assert frame.fin is True
    assert (frame.rsv1, frame.rsv2, frame.rsv3) == (False, False, False)
    assert frame.data == payload


def test_frame_headers_byte_for_byte() -> None:
    """Known headers written out by hand, so both ends cannot share one mistake."""
    assert protocol.frame(b"hi") == b"\x81\x02hi"
    assert protocol.frame(b"\x00\xff", text=False) == b"\x82\x02\x00\xff"
    assert protocol.frame(b"") == b"\x81\x00"
    assert protocol.frame(b"a" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert protocol.frame(b"a" * 65535, text=False)[:4] == b"\x82\x7e\xff\xff"
    assert protocol.frame(b"a" * 65536)[:10] == b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"


def test_ping_frame() -> None:
    """The keepalive ping: FIN + PING, unmasked, payload `shoal` (docs/protocol.md)."""
    assert protocol.PING_FRAME == b"\x89\x05shoal"
    frame = parse(protocol.PING_FRAME)
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.PING, True, b"shoal")
