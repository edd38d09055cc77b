"""The terminal client's pure parts: how a typed line is read (`shoal.client.commands`)
and how what happens is written (`shoal.client.display`), with no server and no loop."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.client import commands
from shoal.client.display import Display, pretty, wants_color

ANSI = re.compile(r"\x1b\[[0-9;]*m")

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(JSON)
def test_coloured_json_is_json_dumps_with_colours_added(value: Any) -> None:
    coloured = pretty(value, color=True)
    assert ANSI.sub("", coloured) == json.dumps(value, indent=2, ensure_ascii=False)
    assert pretty(value, color=False) == json.dumps(value, indent=2, ensure_ascii=False)


def test_each_kind_of_json_value_has_its_colour() -> None:
    coloured = pretty({"s": "x", "n": 1.5, "b": True, "z": None}, color=True)
    assert coloured == (
        "{\n"
        '  \x1b[1;34m"s"\x1b[0m: \x1b[32m"x"\x1b[0m,\n'
        '  \x1b[1;34m"n"\x1b[0m: \x1b[36m1.5\x1b[0m,\n'
        '  \x1b[1;34m"b"\x1b[0m: \x1b[35mtrue\x1b[0m,\n'
        '  \x1b[1;34m"z"\x1b[0m: \x1b[35mnull\x1b[0m\n'
        "}"
    )


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colours_only_on_a_terminal_without_no_color() -> None:
    assert wants_color(Tty(), False, {})
    assert wants_color(Tty(), False, {"NO_COLOR": ""})  # set but empty: no-color.org
    assert not wants_color(Tty(), False, {"NO_COLOR": "1"})
    assert not wants_color(Tty(), True, {})
    assert not wants_color(io.StringIO(), False, {})


def display(*, json_lines: bool = False) -> tuple[Display, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Display(out, err, prog="shoal connect", json_lines=json_lines), out, err


def test_a_person_sees_pretty_messages_hex_previews_and_status_lines() -> None:
    shown, out, err = display()
    shown.message({"type": "hi", "to": ["a"]})
    shown.message("not json")
    shown.binary(bytes(range(20)))
    shown.binary(b"\xff")
    shown.binary(b"")
    shown.event("reconnected", "reconnected after 1.2s", downtime=1.2)
    shown.event("disconnected", None, code=4003)  # nothing for a person
    shown.failure("closed by the server: 4003 kicked")
    assert out.getvalue() == (
        '< {\n    "type": "hi",\n    "to": [\n      "a"\n    ]\n  }\n'
        "< not json\n"
        "< binary, 20 bytes: 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f …\n"
        "< binary, 1 byte: ff\n"
        "< binary, 0 bytes\n"
    )
    assert err.getvalue() == (
        "* reconnected after 1.2s\nshoal connect: closed by the server: 4003 kicked\n"
    )


def test_a_script_gets_one_json_value_per_line() -> None:
    shown, out, err = display(json_lines=True)
    shown.message({"type": "hi", "text": "é\nx"})
    shown.message("not json")
    shown.binary(b"\x00\xff")
    shown.event("disconnected", None, code=4003, reason="kicked", reconnect=False)
    shown.failure("closed by the server: 4003 kicked")
    lines = out.getvalue().splitlines()
    assert lines == ['{"type":"hi","text":"é\\nx"}', '"not json"', '{"binary":"00ff"}']
    assert [json.loads(line) for line in err.getvalue().splitlines()] == [
        {"event": "disconnected", "code": 4003, "reason": "kicked", "reconnect": False},
        {"event": "failed", "message": "closed by the server: 4003 kicked"},
    ]


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("", None),
        ("hello /there", commands.Send("hello /there")),
        ('{"type": "x"}', commands.Send('{"type": "x"}')),
        ("//join x", commands.Send("/join x")),
        ("/join lobby", commands.Send({"type": "join_room", "room": "lobby"})),
        ("/leave lobby", commands.Send({"type": "leave_room", "room": "lobby"})),
        (
            "/room lobby hi  there",
            commands.Send({"type": "room_message", "room": "lobby", "message": "hi  there"}),
        ),
        ("/msg bo psst", commands.Send({"type": "private", "to": "bo", "message": "psst"})),
        ("/binary 00ff 10", commands.Send(b"\x00\xff\x10")),
        ("/help", commands.Help()),
        ("/quit", commands.Quit()),
    ],
)
def test_typed_lines(line: str, command: commands.Command | None) -> None:
    assert commands.parse(line) == command


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("/nope x", "unknown command /nope: /help lists them; //nope sends the line"),
        ("/join", "usage: /join ROOM"),
        ("/room lobby", "usage: /room ROOM TEXT"),
        ("/msg", "usage: /msg USER TEXT"),
        ("/binary zz", "/binary takes hexadecimal bytes, e.g. /binary 00ff: 'zz'"),
        ("/binary", "/binary takes hexadecimal bytes, e.g. /binary 00ff: ''"),
    ],
)
def test_a_mistyped_command_is_not_sent(line: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        commands.parse(line)
