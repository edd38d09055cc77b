"""The lines a person types into the terminal client (`shoal.client.terminal`): a few
commands for the chat protocol, and everything else sent as it is.

Pure: a line goes in, what to do comes out. The terminal client does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HELP = """\
/join ROOM         join ROOM (joined again after every reconnection)
/leave ROOM        leave ROOM
/room ROOM TEXT    send TEXT to the members of ROOM
/msg USER TEXT     send TEXT to USER, privately
/binary HEX        send the bytes HEX (e.g. 00ff 10) as a binary frame
/help              this list
/quit              close the connection and exit (as Ctrl-D or Ctrl-C do)
//TEXT             send /TEXT as it is
any other line     sent as it is, as a text frame (an empty line is not sent)"""
"""What `/help` prints."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send `data`: a str as a text frame, bytes as a binary frame, a dict as JSON text."""

    data: str | bytes | dict[str, Any]


@dataclass(frozen=True, slots=True)
class Help:
    """Show `HELP`."""


@dataclass(frozen=True, slots=True)
class Quit:
    """Close the connection with 1000 and exit."""


Command = Send | Help | Quit


def parse(line: str) -> Command | None:
    """What to do with one typed line (without its newline); None for an empty line.

    Raises:
        ValueError: an unknown command, or a command without what it needs; the message
            says what to type instead. Nothing is to be sent then.
    """
    if not line:
        return None
    if not line.startswith("/"):
        return Send(line)
    if line.startswith("//"):
        return Send(line[1:])
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if name == "help":
        return Help()
    if name == "quit":
        return Quit()
    if name in ("join", "leave"):
        room = _words(name, rest, 1, "ROOM")[0]
        return Send({"type": f"{name}_room", "room": room})
    if name == "room":
        room, text = _words(name, rest, 2, "ROOM TEXT")
        return Send({"type": "room_message", "room": room, "message": text})
    if name == "msg":
        user, text = _words(name, rest, 2, "USER TEXT")
        return Send({"type": "private", "to": user, "message": text})
    if name == "binary":
        try:
            data = bytes.fromhex(rest)
        except ValueError:
            data = b""
        if not data:
            raise ValueError(f"/binary takes hexadecimal bytes, e.g. /binary 00ff: {rest!r}")
        return Send(data)
    raise ValueError(f"unknown command /{name}: /help lists them; //{name} sends the line")


def _words(name: str, rest: str, count: int, usage: str) -> list[str]:
    """`rest` as `count` arguments, the last one taking the rest of the line."""
    words = rest.split(maxsplit=count - 1)
    if len(words) < count:
        raise ValueError(f"usage: /{name} {usage}")
    return words
