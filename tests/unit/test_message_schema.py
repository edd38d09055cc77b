"""The wire schema: server messages checked exactly, and docs/protocol.md kept in step with
it (its close-code table and every JSON example)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from shoal.core import schema
from shoal.core.schema import CloseCode, Reconnect

PROTOCOL_MD = Path(__file__).parents[2] / "docs" / "protocol.md"

# One valid message of each server type, as the chat app sends them.
SERVER_EXAMPLES: dict[str, dict[str, Any]] = {
    "welcome": {"type": "welcome", "user_id": "ann", "connection_id": "n1.0.42.1"},
    "authenticated": {
        "type": "authenticated",
        "user_id": "ann",
        "role": "admin",
        "connection_id": "n1.0.42.1",
    },
    "refreshed": {"type": "refreshed", "expires_at": 1767225600},
    "kicked": {"type": "kicked", "by": "mod", "reason": "spam"},
    "banned": {"type": "banned", "by": "root", "reason": "", "until": 1767225600},
    "user_kicked": {"type": "user_kicked", "user_id": "bo", "connections": 2},
    "user_banned": {"type": "user_banned", "user_id": "bo", "until": 1, "connections": 0},
    "user_unbanned": {"type": "user_unbanned", "user_id": "bo", "was_banned": False},
    "admin_broadcast": {"type": "admin_broadcast", "message": "hi", "timestamp": 6},
    "user_connected": {"type": "user_connected", "user_id": "bo", "total_users": 2},
    "user_disconnected": {"type": "user_disconnected", "user_id": "bo", "total_users": 1},
    "broadcast": {"type": "broadcast", "from": "ann", "message": {"a": 1}, "timestamp": 1},
    "private_message": {"type": "private_message", "from": "ann", "message": "x", "timestamp": 2},
    "message_sent": {"type": "message_sent", "to": "bo", "timestamp": 3},
    "joined_room": {
        "type": "joined_room",
        "room": "r",
        "members": ["ann", "bo"],
        "total_members": 2,
    },
    "left_room": {"type": "left_room", "room": "r"},
    "user_joined_room": {
        "type": "user_joined_room",
        "user_id": "bo",
        "room": "r",
        "total_members": 2,
    },
    "user_left_room": {"type": "user_left_room", "user_id": "bo", "room": "r", "total_members": 1},
    "room_message": {
        "type": "room_message",
        "from": "ann",
        "room": "r",
        "message": [1],
        "timestamp": 4,
    },
    "subscribed": {"type": "subscribed", "channel": "news"},
    "unsubscribed": {"type": "unsubscribed", "channel": "news"},
    "message": {
        "type": "message",
        "channel": "news",
        "from": "ann",
        "message": None,
        "timestamp": 5,
    },
    "metadata_updated": {"type": "metadata_updated", "metadata": {"status": "away"}},
    "presence": {
        "type": "presence",
        "users": [{"user_id": "ann", "rooms": ["r"], "metadata": {"k": 1}}],
        "room": "r",
    },
    "echo": {"type": "echo", "data": {"type": "whatever", "n": 1}},
    "error": {"type": "error", "message": "Not in room"},
    "task_dispatched": {"type": "task_dispatched", "task_id": "17-0", "task": "add"},
    "task_result": {"type": "task_result", "task_id": "17-0", "task": "add", "result": [3]},
    "task_failed": {
        "type": "task_failed",
        "task_id": "17-0",
        "task": "add",
        "error": {"type": "ValueError", "message": "bad"},
    },
    "task_status": {"type": "task_status", "task_id": "17-0", "state": "running"},
}
OPTIONAL = {("presence", "room")}
# A value of the wrong type for each field (strict: no coercion of "2" to 2, nor 2.0 to 2).
WRONG: dict[str, Any] = {
    "user_id": 7,
    "connection_id": None,
    "total_users": "2",
    "from": ["ann"],
    "timestamp": 1.5,
    "to": None,
    "room": 5,
    "members": "ann",
    "total_members": True,
    "channel": {"name": "news"},
    "metadata": [["status", "away"]],
    "users": {"ann": {}},
    "data": "text",
    "task_id": 17,
    "task": ["add"],
    "error": "bad",
    "state": "finished",
    "role": 1,
    "expires_at": "soon",
    "by": None,
    "reason": 3,
    "until": 1.5,
    "connections": "2",
    "was_banned": "yes",
}
# The application's payload (`message`) and a task's result: any JSON value (but the
# `message` of `error` is text).
ANY_VALUE = {"message", "result"}


def test_examples_cover_every_server_type() -> None:
    """The table above has one message of each server type, no more."""
    assert set(SERVER_EXAMPLES) == set(schema.SERVER_TYPES)


@pytest.mark.parametrize("name", sorted(SERVER_EXAMPLES))
def test_each_server_message_type_is_accepted(name: str) -> None:
    """A well-formed message of each type passes."""
    schema.check_server_message(dict(SERVER_EXAMPLES[name]))


def test_optional_room_of_presence_may_be_left_out() -> None:
    """`presence` answers a whole-server query without `room`."""
    message = dict(SERVER_EXAMPLES["presence"])
    del message["room"]
    schema.check_server_message(message)


@pytest.mark.parametrize(
    ("name", "field"),
    [
        (name, field)
        for name, example in SERVER_EXAMPLES.items()
        for field in example
        if field != "type" and (name, field) not in OPTIONAL
    ],
)
def test_missing_field_is_refused(name: str, field: str) -> None:
    """Every field but the optional ones is required."""
    message = dict(SERVER_EXAMPLES[name])
    del message[field]
    with pytest.raises(ValueError, match=field):
        schema.check_server_message(message)


@pytest.mark.parametrize("name", sorted(SERVER_EXAMPLES))
def test_extra_field_is_refused(name: str) -> None:
    """No field beyond the schema's: what a client may rely on is exactly what is listed."""
    with pytest.raises(ValueError, match="surplus"):
        schema.check_server_message({**SERVER_EXAMPLES[name], "surplus": 1})


@pytest.mark.parametrize(
    ("name", "field"),
    [
        (name, field)
        for name, example in SERVER_EXAMPLES.items()
        for field in example
        if field != "type" and (field not in ANY_VALUE or name == "error")
    ],
)
def test_field_of_the_wrong_type_is_refused(name: str, field: str) -> None:
    """Each typed field refuses a value of another JSON type."""
    bad = 404 if field == "message" else WRONG[field]
    with pytest.raises(ValueError, match=field):
        schema.check_server_message({**SERVER_EXAMPLES[name], field: bad})


# What a room with a history adds to each of its messages (and `joined_room`).
POSITION = {"offset": "7-0", "epoch": "5a82123cf2b87729"}


@pytest.mark.parametrize(
    "name", ["room_message", "user_joined_room", "user_left_room", "joined_room"]
)
def test_a_room_with_a_history_adds_offset_and_epoch(name: str) -> None:
    schema.check_server_message({**SERVER_EXAMPLES[name], **POSITION})
    with pytest.raises(ValueError, match="offset"):
        schema.check_server_message({**SERVER_EXAMPLES[name], **POSITION, "offset": 7})


def test_join_room_may_resume_from_a_position() -> None:
    schema.check_client_message({"type": "join_room", "room": "r", "since": POSITION})
    with pytest.raises(ValueError, match="since"):
        schema.check_client_message({"type": "join_room", "room": "r", "since": {"offset": "7-0"}})


@pytest.mark.parametrize(
    "entry",
    [
        {"user_id": "ann", "rooms": ["r"]},
        {"user_id": "ann", "rooms": ["r"], "metadata": {}, "surplus": 1},
        {"user_id": "ann", "rooms": "r", "metadata": {}},
    ],
    ids=["missing-metadata", "extra-field", "rooms-not-a-list"],
)
def test_presence_entries_are_checked_too(entry: dict[str, Any]) -> None:
    """The users listed by `presence` are held to the schema as strictly as the message."""
    with pytest.raises(ValueError, match="users"):
        schema.check_server_message({"type": "presence", "users": [entry]})


@pytest.mark.parametrize("kind", ["join_room", "nope", None, 1])
def test_unknown_server_type_is_refused(kind: Any) -> None:
    """A client's type, an unknown one, or none at all is no server message."""
    with pytest.raises(ValueError, match="unknown message type"):
        schema.check_server_message({"type": kind, "room": "r"})


def test_client_messages_are_checked_on_their_own_side() -> None:
    """The same name can be a client and a server type with different fields."""
    schema.check_client_message({"type": "broadcast", "message": "hi"})
    schema.check_client_message({"type": "presence"})
    with pytest.raises(ValueError, match="from"):
        schema.check_client_message({"type": "broadcast", "message": "hi", "from": "ann"})
    with pytest.raises(ValueError, match="unknown message type"):
        schema.check_client_message({"type": "welcome"})


def test_advice_for_codes_shoal_never_sends() -> None:
    """1006 and unknown codes: reconnect with backoff and resync."""
    for code in (1006, 4999, 0):
        advice = schema.advice(code)
        assert (advice.reconnect, advice.resync) == (Reconnect.BACKOFF, True)
    assert schema.advice(1008).reconnect is Reconnect.NEVER
    assert schema.advice(4000) is schema.ADVICE[CloseCode.SLOW_CONSUMER]


# docs/protocol.md


def section(title: str) -> str:
    """The text of one `## ` section of docs/protocol.md."""
    text = PROTOCOL_MD.read_text()
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : None if end < 0 else end]


def test_close_code_table_lists_exactly_the_codes_of_the_schema() -> None:
    """Docs and schema cannot drift: the table of "## Close codes" has one row per code
    in `schema.ADVICE`, and no other."""
    rows = re.findall(r"^\|\s*(\d+)\s*\|", section("## Close codes"), re.MULTILINE)
    assert rows, "no close-code rows found in docs/protocol.md"
    assert sorted(int(code) for code in rows) == sorted(int(code) for code in schema.ADVICE)


# How the "Reconnect?" column of the docs says each advice of the schema.
_SAYS = {
    Reconnect.PROMPTLY: "Yes, after a short random delay",
    Reconnect.BACKOFF: "Yes",
    Reconnect.NEVER: "Not ",
    Reconnect.OPTIONAL: "Only if",
}


def test_close_code_table_gives_the_advice_of_the_schema() -> None:
    """The reconnect advice a client library reads from the schema is what the docs say."""
    for line in section("## Close codes").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not cells[0].isdigit():
            continue
        advice = schema.ADVICE[CloseCode(int(cells[0]))]
        says = cells[-1]
        assert says.startswith(_SAYS[advice.reconnect]), (cells[0], says)
        if advice.reconnect is Reconnect.BACKOFF:
            assert "random delay" not in says, (cells[0], says)


def json_examples() -> list[tuple[int, Any]]:
    """(line, value) of each ```json block of docs/protocol.md that holds one message."""
    text = PROTOCOL_MD.read_text()
    examples = []
    for match in re.finditer(r"^```json\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        examples.append((line, json.loads(match.group(1))))
    return examples


def message_examples() -> list[tuple[int, dict[str, Any]]]:
    """The examples whose `type` is a chat message type (of either side)."""
    known = set(schema.SERVER_TYPES) | set(schema.CLIENT_TYPES)
    return [
        (line, value)
        for line, value in json_examples()
        if isinstance(value, dict) and value.get("type") in known
    ]


def sides(message: dict[str, Any]) -> set[str]:
    """Which of "server" and "client" accept `message`."""
    accepted = set()
    for side, check in (
        ("server", schema.check_server_message),
        ("client", schema.check_client_message),
    ):
        try:
            check(message)
        except ValueError:
            continue
        accepted.add(side)
    return accepted


@pytest.mark.parametrize(
    "message",
    [pytest.param(value, id=f"line-{line}") for line, value in message_examples()],
)
def test_every_message_example_in_the_docs_passes_the_schema(message: dict[str, Any]) -> None:
    """A documented message is a valid server or client message of its type."""
    assert sides(message), f"docs/protocol.md example fits no schema: {message}"


def test_docs_show_an_example_of_every_message_type() -> None:
    """Every server and client type has a valid example in the docs (so the test above
    cannot pass by finding none)."""
    server, client = set(), set()
    for _, message in message_examples():
        accepted = sides(message)
        if "server" in accepted:
            server.add(message["type"])
        if "client" in accepted:
            client.add(message["type"])
    assert set(schema.SERVER_TYPES) - server == set()
    assert set(schema.CLIENT_TYPES) - client == set()
