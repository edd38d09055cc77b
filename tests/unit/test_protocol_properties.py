"""Property-based tests (hypothesis) of the protocol layer: whatever a client or another
process sends, parsing, the field helpers, the framing fast path and the bus envelope
either return something well-formed or raise the one error type their callers handle,
with a message from a known set. Never another exception: in a worker that would be an
"Internal error" and a traceback per message.

Pure functions only: no loop, no Redis, no socket (tests/e2e/test_live_properties.py
throws the same kind of input at a live server).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import Any, get_type_hints

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typing_extensions import is_typeddict
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from shoal.core import envelope, protocol, schema
from shoal.core.envelope import Departed, Message, TaskDone
from shoal.core.errors import EnvelopeError, ProtocolError

from support import websockets_frames

PARSE_ERRORS = {protocol.INVALID_FORMAT, protocol.TOO_DEEP}
# The encoder (orjson) refuses integers outside these; the parser reads them as floats.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1

# Every kind of JSON scalar a client can send, and a few a client should not: huge and
# tiny numbers, NaN and infinities (which `json.dumps` writes as bare words), lone
# surrogates, NUL and other control characters, and what Redis keys treat specially.
texts = st.text(st.characters(codec=None), max_size=40) | st.sampled_from(
    ["", "\x00", "a\x00b", ":*", "*", "room:*", "\n", "\r\n", "\ud800", "\udfff", "é", "🐟"]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=20,
)
# What a client can send as JSON at all: text that UTF-8 can carry, finite numbers that
# fit the encoder (wider integers come back as floats).
utf8_texts = st.text(st.characters(codec="utf-8"), max_size=40)
sendable_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(INT_MIN, INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | utf8_texts,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(utf8_texts, children, max_size=4)
    ),
    max_leaves=20,
)


def nested(depth: int) -> str:
    """JSON text of `depth` levels of objects and arrays, alternating, around a 0 (written
    out: the standard library's encoder recurses once per level)."""
    opening = "".join('{"k":' if level % 2 else "[" for level in range(depth))
    closing = "".join("}" if level % 2 else "]" for level in reversed(range(depth)))
    return opening + "0" + closing


def deep_message(depth: int, kind: str = "x") -> str:
    """A message of type `kind` nested `depth` levels deep (its own object included)."""
    return '{"type":' + json.dumps(kind) + ',"x":' + nested(depth - 1) + "}"


@st.composite
def deep_messages(draw: st.DrawFn) -> str:
    """A message nested anywhere from a little to far beyond what anyone accepts."""
    depth = draw(st.integers(2, 1500) | st.integers(60, 70) | st.integers(1020, 1030))
    return deep_message(depth, draw(texts))


@st.composite
def mangled_json(draw: st.DrawFn) -> bytes:
    """Valid JSON, then cut, with bytes changed, inserted or dropped."""
    data = bytearray(json.dumps(draw(json_values)).encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["cut", "flip", "insert", "drop"]))
        if action == "cut":
            del data[at:]
        elif action == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif at < len(data):
            del data[at]
    return bytes(data)


def wire_forms(value: Any) -> st.SearchStrategy[str | bytes]:
    """`value` written as a client might: ASCII-escaped or raw UTF-8, as str or bytes."""
    escaped = json.dumps(value)
    forms: list[str | bytes] = [escaped, escaped.encode()]
    try:
        raw = json.dumps(value, ensure_ascii=False)
        forms += [raw, raw.encode()]
    except UnicodeEncodeError:  # pragma: no cover - dumps does not encode; kept for safety
        pass
    return st.sampled_from(forms)


raw_messages: st.SearchStrategy[str | bytes] = st.one_of(
    st.binary(max_size=200),
    st.text(st.characters(codec=None), max_size=200),
    json_values.flatmap(wire_forms),
    st.fixed_dictionaries({"type": texts}, optional={"x": json_values}).flatmap(wire_forms),
    st.dictionaries(texts, json_values, max_size=4).flatmap(wire_forms),
    mangled_json(),
    deep_messages(),
)


class Refused(Exception):
    """What the reference parser below refuses: `errors` holds the acceptable messages."""

    def __init__(self, *errors: str) -> None:
        super().__init__(errors)
        self.errors = set(errors)


def reference_parse(raw: str | bytes) -> dict[str, Any]:
    """What `protocol.parse` should return, from the standard library's JSON parser and
    the rules docs/protocol.md states, written independently of shoal's code.

    Raises:
        Refused: with the error messages the client may get.
    """
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # the standard parser recurses per level
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw  # the wire is UTF-8
        value = json.loads(text, parse_constant=_no_constant, parse_int=_int)
    except ValueError:
        if _brackets(raw) > 1024:
            # Broken, and perhaps opening more levels than orjson's limit before the
            # fault: which of the two errors comes first depends on where each is.
            raise Refused(*PARSE_ERRORS) from None
        raise Refused(protocol.INVALID_FORMAT) from None
    finally:
        sys.setrecursionlimit(limit)
    if _has(value, _bad_scalar) or _has_surrogate_key(value):
        raise Refused(protocol.INVALID_FORMAT)
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        # orjson stops at 1024 levels before it knows what the top level holds.
        raise Refused(protocol.TOO_DEEP if _depth(value) > 1024 else protocol.INVALID_FORMAT)
    if _depth(value) > protocol.MAX_DEPTH:
        raise Refused(protocol.TOO_DEEP)
    return value


def _brackets(raw: str | bytes) -> int:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return text.count("[") + text.count("{")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity


def _int(digits: str) -> int | float:
    value = int(digits)
    # Beyond 64 bits orjson reads a float, and a number too big for a float not at all.
    return value if INT_MIN <= value <= INT_MAX else float(value)


def _bad_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isinf(value)  # "1e400": too big for a double
    if isinstance(value, str):
        return _lone_surrogate(value)
    return False


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _has(value: Any, bad: Callable[[Any], bool]) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, list):
            stack += item
        elif bad(item):
            return True
    return False


def _has_surrogate_key(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any(_lone_surrogate(key) for key in item):
                return True
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return False


def _depth(value: Any) -> int:
    """Levels of objects and arrays: 1 for `{}`, 0 for a scalar."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack += [(child, level + 1) for child in children]
    return deepest


# Parsing


@given(raw_messages)
@example(deep_message(1100))
@example(nested(1100))
@example(b'{"type":"x","n":1e400}')
@example(b'{"type":"x","n":18446744073709551616}')
@example('{"type":"x","s":"\\ud800"}')
@example('{"type":"\ud800"}')
@example(b'\xef\xbb\xbf{"type":"x"}')
@example(b'{"type":"x"}\x00')
@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
def test_parse_accepts_exactly_typed_json_objects(raw: str | bytes) -> None:
    """parse returns the message the standard library reads (a dict with a str `type`),
    or raises ProtocolError with the message docs/protocol.md gives for the case."""
    try:
        expected: dict[str, Any] | Refused = reference_parse(raw)
    except Refused as refused:
        expected = refused
    message, error = _parse(raw)
    if isinstance(expected, Refused):
        assert error in expected.errors, f"{raw!r}: {error or message!r}, not {expected.errors}"
    else:
        assert error is None, f"{raw!r} refused: {error}, expected {expected!r}"
        assert type(message) is dict and type(message["type"]) is str
        assert message == expected


def _parse(raw: str | bytes) -> tuple[dict[str, Any] | None, str | None]:
    """parse's message, or its error's text; any other exception goes up."""
    try:
        return protocol.parse(raw), None
    except ProtocolError as exc:
        return None, str(exc)


@given(raw_messages)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_what_parse_accepts_encode_writes_back(raw: str | bytes) -> None:
    """Anything parse accepts can be encoded again, also wrapped as deep as the server
    wraps a client's data (metadata inside a presence entry inside a presence reply),
    and parses back to the same value."""
    message, error = _parse(raw)
    if message is None:
        assert error in PARSE_ERRORS
        return
    encoded = protocol.encode(message)
    assert protocol.parse(encoded) == message
    reply = {"type": "presence", "users": [{"user_id": "u", "rooms": [], "metadata": message}]}
    assert orjson.loads(protocol.encode({"type": "echo", "data": reply})) == {
        "type": "echo",
        "data": reply,
    }


@pytest.mark.parametrize("depth", [1025, 1026, 5000])
def test_nesting_past_the_json_parsers_own_limit_is_too_deep(depth: int) -> None:
    """Regression: valid JSON nested more than 1024 levels was answered "Invalid message
    format" (orjson's own limit) where every shallower excess got the nesting error."""
    for raw in (deep_message(depth), nested(depth)):
        with pytest.raises(ProtocolError) as refused:
            protocol.parse(raw)
        assert str(refused.value) == protocol.TOO_DEEP
        with pytest.raises(ProtocolError) as refused:
            protocol.parse(raw.encode())
        assert str(refused.value) == protocol.TOO_DEEP


def test_invalid_json_with_many_brackets_is_still_invalid() -> None:
    """Broken JSON that does not open more levels than the parser's limit stays broken."""
    for raw in ("[" * 1000 + "x", '{"type":"x"}' + "[" * 2000, "{" * 10 + "]" * 2000):
        with pytest.raises(ProtocolError) as refused:
            protocol.parse(raw)
        assert str(refused.value) == protocol.INVALID_FORMAT, raw[:20]


# Fields of every client message type


def _field_values(hint: Any) -> st.SearchStrategy[Any]:
    """Valid values of one field of a client message, from its annotation in the schema."""
    if hint is str:
        return st.text(st.characters(codec="utf-8"), min_size=1, max_size=protocol.MAX_NAME_LENGTH)
    if hint is int:
        return st.integers(INT_MIN, INT_MAX)
    if getattr(hint, "__origin__", None) is dict:
        return st.dictionaries(utf8_texts, sendable_values, max_size=3)
    if is_typeddict(hint):  # an object of its own fields (`since`)
        fields = get_type_hints(hint).items()
        return st.fixed_dictionaries({key: _field_values(inner) for key, inner in fields})
    return sendable_values.filter(lambda value: value is not None)  # `Any`: a message


@st.composite
def client_messages(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A message of every client type, valid for the schema, with its type's name."""
    name = draw(st.sampled_from(sorted(schema.CLIENT_TYPES)))
    kind = schema.CLIENT_TYPES[name]
    hints = get_type_hints(kind)
    message: dict[str, Any] = {"type": name}
    for key, hint in hints.items():
        if key == "type":
            continue
        if key in kind.__required_keys__ or draw(st.booleans()):
            message[key] = draw(_field_values(hint))
    return name, message


def _wrong(hint: Any) -> st.SearchStrategy[Any]:
    """Values of any JSON type but the one a field of annotation `hint` must have."""
    if hint is str:
        return sendable_values.filter(lambda value: not isinstance(value, str))
    return sendable_values.filter(lambda value: not isinstance(value, dict))


NAME_FIELDS = {"room", "channel", "to", "user_id"}


@given(client_messages(), st.data())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_every_field_of_every_client_type_with_a_wrong_type(
    typed: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    """Valid client messages pass the schema and travel through encode and parse
    unchanged; with one field of the wrong type, absent or null, the schema refuses them
    with a ValueError only, and the field helpers with the documented error only."""
    name, message = typed
    schema.check_client_message(message)
    wire = protocol.encode(message)
    assert protocol.parse(wire) == message
    hints = {k: v for k, v in get_type_hints(schema.CLIENT_TYPES[name]).items() if k != "type"}
    typed_fields = [k for k, hint in hints.items() if hint is str or _is_dict(hint)]
    assume(typed_fields)
    key = data.draw(st.sampled_from(typed_fields))
    bad = data.draw(_wrong(hints[key]) | st.sampled_from(["", "x" * 257, None]))
    if isinstance(bad, str) and (hints[key] is not str or key not in NAME_FIELDS):
        assume(False)  # a string is valid for this field
    broken = {**message, key: bad}
    try:
        # Strings of any length pass the schema: the length rule is the server's.
        schema.check_client_message(broken)
        assert isinstance(bad, str)
    except ValidationError:
        pass
    check = protocol.name_field if key in NAME_FIELDS else protocol.field
    received = protocol.parse(protocol.encode(broken))
    value, error = _check(check, received, key)
    if error is None:
        assert check is protocol.field and value == bad  # any non-null value is a value
    else:
        assert error == (f"Missing {key}" if bad is None else f"Invalid {key}")


def _check(
    helper: Callable[[dict[str, Any], str], Any], message: dict[str, Any], name: str
) -> tuple[Any, str | None]:
    """What a field helper returns, or its error's text; any other exception goes up."""
    try:
        return helper(message, name), None
    except ProtocolError as exc:
        return None, str(exc)


def _is_dict(hint: Any) -> bool:
    return getattr(hint, "__origin__", None) is dict or is_typeddict(hint)


@given(st.dictionaries(texts, json_values, max_size=4), texts)
@example({"room": "x" * 256}, "room")
@example({"room": "x" * 257}, "room")
@example({"room": ""}, "room")
@example({"room": None}, "room")
@example({"room": False}, "room")
def test_field_helpers_return_the_value_or_a_clear_error(
    message: dict[str, Any], name: str
) -> None:
    """`field` returns any non-null value; `name_field` a string of 1 to 256 characters;
    otherwise each raises "Missing <name>" or "Invalid <name>", nothing else."""
    value = message.get(name)
    got, error = _check(protocol.field, message, name)
    assert (got, error) == ((None, f"Missing {name}") if value is None else (value, None))
    got, error = _check(protocol.name_field, message, name)
    valid = isinstance(value, str) and 1 <= len(value) <= protocol.MAX_NAME_LENGTH
    if value is None:
        assert error == f"Missing {name}"
    elif not valid:
        assert error == f"Invalid {name}"
    else:
        assert error is None and got is value


# Framing: the fast path for client frames, and where the last whole frame ends

MAX_SIZE = 1000
OPCODES = [Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING, Opcode.PONG, Opcode.CLOSE]


@st.composite
def client_frames(draw: st.DrawFn) -> bytes:
    """One frame as a client might send it, well-formed or not: any opcode (reserved ones
    too), fragments, extension bits, unmasked, and lengths of every size class, up to
    past `MAX_SIZE`."""
    opcode = draw(st.sampled_from(OPCODES))
    control = opcode in (Opcode.PING, Opcode.PONG, Opcode.CLOSE)
    size = draw(st.integers(0, 125) if control else st.sampled_from([0, 1, 125, 126, 300, 1001]))
    payload = draw(st.binary(min_size=size, max_size=size))
    if opcode is Opcode.CLOSE:
        payload = b"\x03\xe8" + payload[2:] if size >= 2 else b""
    fin = control or draw(st.booleans())
    wire = bytearray(Frame(opcode, payload, fin).serialize(mask=draw(st.booleans())))
    if draw(st.integers(0, 9)) == 0:
        wire[0] |= draw(st.sampled_from([0x40, 0x20, 0x10]))  # an extension bit
    if draw(st.integers(0, 19)) == 0:
        wire[0] = (wire[0] & 0xF0) | draw(st.sampled_from([3, 4, 5, 6, 7, 11, 15]))
    return bytes(wire)


frame_streams = st.lists(client_frames(), min_size=1, max_size=5).map(b"".join)


@given(frame_streams, st.data())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_whole_messages_agrees_with_websockets(wire: bytes, data: st.DataObject) -> None:
    """The fast path returns exactly websockets' leading whole, plain, final text and
    binary frames, with their unmasked payloads, wherever the stream is cut."""
    cut = data.draw(st.integers(0, len(wire)))
    for stream in (wire, wire[:cut]):
        expected = []
        for frame, stop in websockets_frames(stream, MAX_SIZE):
            plain = frame.fin and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
            if not plain or frame.opcode not in (Opcode.TEXT, Opcode.BINARY):
                break
            expected.append((frame.opcode is Opcode.TEXT, bytes(frame.data), stop))
        assert protocol.whole_messages(stream, MAX_SIZE) == expected


@given(st.binary(max_size=300), st.integers(0, 2**64), st.data())
@example(b"\x81\xff" + b"\xff" * 8, MAX_SIZE, None)
@example(b"\x81\xfe\xff", MAX_SIZE, None)
@example(b"\x81\x7f" + b"\x00" * 8, 0, None)
def test_framing_helpers_never_fail_on_arbitrary_bytes(
    data: bytes, max_size: int, more: st.DataObject | None
) -> None:
    """On any bytes, with any limit: no exception, every offset within the input and
    increasing, and each payload exactly the announced length."""
    found = protocol.whole_messages(data, max_size)
    previous = 0
    for _, payload, stop in found:
        assert previous < stop <= len(data)
        assert len(payload) <= max_size
        previous = stop
    at = 0 if more is None else more.draw(st.integers(0, len(data)))
    end = protocol.frames_end(data, at, max_size)
    assert at <= end <= len(data)


@given(st.lists(client_frames(), min_size=1, max_size=5), st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_frames_end_is_the_end_of_the_last_whole_frame(
    frames: list[bytes], data: st.DataObject
) -> None:
    """Wherever a stream of frames of any kind is cut, frames_end is where the last frame
    wholly inside the cut ends, or the end of the cut once a frame's length field says
    more than the limit (websockets refuses it on that, before its mask)."""
    wire = b"".join(frames)
    cut = data.draw(st.integers(0, len(wire)))
    expected = 0
    offset = 0
    for one in frames:
        announced = one[1] & 0x7F
        length_end = 2  # where the length field ends
        if announced == 126:
            announced, length_end = int.from_bytes(one[2:4]), 4
        elif announced == 127:
            announced, length_end = int.from_bytes(one[2:10]), 10
        if announced > MAX_SIZE and cut - offset >= length_end:
            expected = cut  # its length is all there: websockets refuses it on that
            break
        if offset + len(one) > cut:
            break
        offset += len(one)
        expected = offset
    assert protocol.frames_end(wire[:cut], 0, MAX_SIZE) == expected


@given(st.binary(max_size=2000), st.booleans())
def test_frame_is_what_websockets_reads(payload: bytes, text: bool) -> None:
    """A server frame parses back, with websockets' client-side parser, to the payload."""
    wire = protocol.frame(payload, text=text)
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame = done.value.value
    assert frame.opcode is (Opcode.TEXT if text else Opcode.BINARY) and frame.fin
    assert bytes(frame.data) == payload and not reader.buffer


# The bus envelope

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(st.characters(codec="utf-8"), max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=5) | st.integers(-(2**63), 2**63), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def envelope_like(draw: st.DrawFn) -> bytes:
    """msgpack arrays that start as an envelope does: version, kind, then anything."""
    version = draw(st.sampled_from([1, 1, 1, 0, 2, -1, "1", True]))
    kind = draw(st.sampled_from([1, 2, 3, 0, 4, "1", None, 1.0]))
    body = draw(st.lists(msgpack_values, max_size=6))
    return bytes(msgpack.packb([version, kind, *body]))


@given(
    st.binary(max_size=200)
    | msgpack_values.map(lambda value: bytes(msgpack.packb(value)))
    | envelope_like()
    | st.builds(
        lambda good, junk: good + junk,
        st.sampled_from([envelope.message(b"{}", None), envelope.departed([("u", ["r"])])]),
        st.binary(min_size=1, max_size=8),
    )
)
@example(b"\xdd\xff\xff\xff\xff")  # an array announcing 4 billion items
@example(b"\xdf\xff\xff\xff\xff")  # a map announcing as many
@example(b"\xc6\xff\xff\xff\xff")  # bin of 4 GiB
@example(b"\x91" * 2000 + b"\xc0")  # nested deeper than msgpack's stack
@example(b"\xd6\xff\x00\x00\x00\x00")  # a timestamp extension
@example(b"\xc4\x05\x01\x01abc")  # bin whose bytes look like version 1, kind 1
@example(b"\x81\x91\x01\x01")  # a map with a list as key
def test_envelope_decode_of_arbitrary_bytes_fails_cleanly(data: bytes) -> None:
    """unpack returns a well-typed envelope or raises EnvelopeError: a worker skips what
    it cannot read and keeps its subscriber link."""
    try:
        unpacked = envelope.unpack(data)
    except EnvelopeError:
        return
    if isinstance(unpacked, Message):
        assert type(unpacked.text) is bool and type(unpacked.payload) is bytes
        assert unpacked.target is None or isinstance(unpacked.target, (str, list))
    elif isinstance(unpacked, Departed):
        assert all(type(u) is str and type(rs) is list for u, rs in unpacked.users)
    else:
        assert type(unpacked) is TaskDone and type(unpacked.body) is bytes


@given(
    st.binary(max_size=100),
    st.none() | st.text(max_size=20) | st.lists(st.text(max_size=20), max_size=5),
    st.booleans(),
    st.lists(st.tuples(st.text(max_size=10), st.lists(st.text(max_size=10), max_size=3))),
)
def test_envelopes_round_trip(
    payload: bytes, target: str | list[str] | None, text: bool, users: list[tuple[str, list[str]]]
) -> None:
    assert envelope.unpack(envelope.message(payload, target, text=text)) == Message(
        text, payload, target
    )
    assert envelope.unpack(envelope.departed(users)) == Departed(users)
