"""How the terminal client (`shoal.client.terminal`) shows what happens.

Two streams: what the server sent goes to `out` (stdout), the client's own status lines
to `err` (stderr), so that `shoal-connect URL > log` keeps the messages alone.

- For a person: a message starts with `< `; JSON is pretty-printed, with colours when
  asked (on a terminal); a binary frame shows its length and its first bytes in hex; a
  status line starts with `* `.
- For scripts (`json_lines`): each message is one compact JSON value on a line of
  `out` (a binary frame: `{"binary": "<hex>"}`), each status event one JSON object on a
  line of `err`, `{"event": <name>, ...}`. No colours.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

PREVIEW = 16
"""The bytes of a binary frame shown in hex, for a person."""

# ANSI SGR sequences.
_RESET = "\x1b[0m"
_KEY = "\x1b[1;34m"  # bold blue
_STRING = "\x1b[32m"  # green
_NUMBER = "\x1b[36m"  # cyan
_LITERAL = "\x1b[35m"  # magenta: true, false, null
_MARK = "\x1b[2m"  # dim: the `< ` before a message
_BINARY = "\x1b[35m"
_STATUS = "\x1b[33m"  # yellow
_ALARM = "\x1b[1;31m"  # bold red
_ALARMS = frozenset({"error", "failed"})


def wants_color(stream: TextIO, disabled: bool, environ: Mapping[str, str]) -> bool:
    """Whether to colour what goes to `stream`: only a terminal, and neither `--no-color`
    (`disabled`) nor a non-empty `NO_COLOR` variable (https://no-color.org)."""
    return not disabled and not environ.get("NO_COLOR") and stream.isatty()


def pretty(value: Any, color: bool) -> str:
    """`value` as `json.dumps(value, indent=2, ensure_ascii=False)` writes it; with
    `color`, keys, strings, numbers and literals are wrapped in ANSI colours (removing
    them gives the same text back)."""
    if not color:
        return json.dumps(value, indent=2, ensure_ascii=False)
    return "".join(_colored(value, 0))


def _colored(value: Any, level: int) -> Iterator[str]:
    if isinstance(value, dict | list) and value:
        inner = "  " * (level + 1)
        if isinstance(value, dict):
            opening, closing = "{", "}"
            keys = [f"{_KEY}{_dumps(str(key))}{_RESET}: " for key in value]
            items = list(value.values())
        else:
            opening, closing = "[", "]"
            keys, items = [""] * len(value), value
        yield opening + "\n"
        for n, (key, item) in enumerate(zip(keys, items, strict=True)):
            yield inner + key
            yield from _colored(item, level + 1)
            yield ",\n" if n < len(items) - 1 else "\n"
        yield "  " * level + closing
    elif isinstance(value, dict | list):
        yield _dumps(value)
    elif value is None or isinstance(value, bool):
        yield f"{_LITERAL}{_dumps(value)}{_RESET}"
    elif isinstance(value, int | float):
        yield f"{_NUMBER}{_dumps(value)}{_RESET}"
    else:
        yield f"{_STRING}{_dumps(value)}{_RESET}"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def compact(value: Any) -> str:
    """`value` as one line of compact JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class Display:
    """Writes messages to `out` and status to `err`, for a person or for scripts.

    Args:
        out, err: the streams (stdout, stderr); each line is flushed at once.
        prog: the program's name, before the message of a failure.
        json_lines: write for scripts (JSON lines), not for a person.
        color_out, color_err: colour what goes to each stream (a person's only).
    """

    def __init__(
        self,
        out: TextIO,
        err: TextIO,
        *,
        prog: str,
        json_lines: bool = False,
        color_out: bool = False,
        color_err: bool = False,
    ) -> None:
        self.out = out
        self.err = err
        self.prog = prog
        self.json_lines = json_lines
        self.color_out = color_out and not json_lines
        self.color_err = color_err and not json_lines

    def message(self, value: Any) -> None:
        """A text message: its JSON value, or a str (text that is not JSON)."""
        if self.json_lines:
            self._write(self.out, compact(value))
        elif isinstance(value, str):
            self._write(self.out, self._mark() + value)
        else:
            text = pretty(value, self.color_out).replace("\n", "\n  ")
            self._write(self.out, self._mark() + text)

    def binary(self, data: bytes) -> None:
        """A binary message."""
        if self.json_lines:
            self._write(self.out, compact({"binary": data.hex()}))
            return
        preview = data[:PREVIEW].hex(" ") + (" …" if len(data) > PREVIEW else "")
        size = f"{len(data)} byte" + ("" if len(data) == 1 else "s")
        text = f"binary, {size}: {preview}".rstrip(": ")
        if self.color_out:
            text = f"{_BINARY}{text}{_RESET}"
        self._write(self.out, self._mark() + text)

    def event(self, name: str, text: str | None, /, **fields: Any) -> None:
        """A status event: for scripts, `{"event": name, **fields}`; for a person, `text`
        as a status line (none when `text` is None), in red for `error` and `failed`."""
        if self.json_lines:
            self._write(self.err, compact({"event": name, **fields}))
        elif text is not None:
            line = "* " + text.replace("\n", "\n  ")
            if self.color_err:
                line = f"{_ALARM if name in _ALARMS else _STATUS}{line}{_RESET}"
            self._write(self.err, line)

    def failure(self, message: str) -> None:
        """Why the program ends with an error: `failed` for scripts; `<prog>: <message>`
        for a person."""
        if self.json_lines:
            self.event("failed", None, message=message)
            return
        line = f"{self.prog}: {message}"
        self._write(self.err, f"{_ALARM}{line}{_RESET}" if self.color_err else line)

    def _mark(self) -> str:
        return f"{_MARK}<{_RESET} " if self.color_out else "< "

    @staticmethod
    def _write(stream: TextIO, line: str) -> None:
        stream.write(line + "\n")
        stream.flush()
