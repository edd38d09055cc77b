"""`shoal connect`, the terminal client, as a person and a script use it: in a real
pseudo-terminal and through pipes, against a live two-worker server (stopped and started
again, a moderator's kick, a refused token) and a small echo server of the test's own
(what reaches the server, how it is closed)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import ServerConnection, serve
from websockets.typing import Subprotocol

from support import SCALE, SHOAL, Shoal, free_port, wait_until

Sign = Callable[..., str]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Terminal:
    """`shoal connect ARGS` in a pseudo-terminal of its own, as a person runs it: its
    stdin, stdout and stderr are the terminal, so Ctrl-C and Ctrl-D are typed, not sent."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        environ = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        environ.update(env or {})
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal is its controlling terminal
            try:
                os.execve(sys.executable, [*SHOAL, "connect", *args], environ)
            finally:
                os._exit(127)
        self.raw = b""
        self.read_to = 0  # where the next expect() starts looking, in text()
        self.status: int | None = None

    def text(self) -> str:
        """Everything shown so far, without colours, with the terminal's \\r\\n as \\n."""
        return ANSI.sub("", self.raw.decode(errors="replace")).replace("\r\n", "\n")

    def _read(self, timeout: float) -> bool:
        """Read what the terminal shows within `timeout`; False once it is closed."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the program exited and the terminal has no writer left
            return False
        self.raw += chunk
        return bool(chunk)

    def expect(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """Wait until the regular expression `pattern` shows, after the last match."""
        deadline = time.monotonic() + timeout * SCALE
        while True:
            found = re.compile(pattern).search(self.text(), self.read_to)
            if found:
                self.read_to = found.end()
                return found
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.2)):
                shown = self.text()[self.read_to :]
                raise AssertionError(f"{pattern!r} never showed; after the last match:\n{shown}")

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def wait(self, timeout: float = 10) -> int:
        """Its exit status, reading what it shows meanwhile (a full terminal would block
        it)."""

        def exited() -> bool:
            self._read(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            return self.status is not None

        if self.status is None:
            wait_until(exited, timeout, "shoal connect to exit")
        assert self.status is not None
        return self.status

    def close(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    """`terminal(*args)`: start `shoal connect ARGS` in a pseudo-terminal."""
    started: list[Terminal] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Terminal:
        started.append(Terminal(*args, env=env))
        return started[-1]

    yield start
    for term in started:
        term.close()


def next_of(ws: ClientConnection, kind: str, **fields: Any) -> dict[str, Any]:
    """The next message of type `kind` with `fields` that a plain websockets client
    receives (skipping others: presence notices, its own room messages)."""
    deadline = time.monotonic() + 10 * SCALE
    while True:
        message: dict[str, Any] = json.loads(ws.recv(timeout=deadline - time.monotonic()))
        if message["type"] == kind and fields.items() <= message.items():
            return message


@contextlib.contextmanager
def member(node: Shoal, user: str, room: str) -> Iterator[ClientConnection]:
    """A plain websockets client of `user` in `room`: independent of shoal's client."""
    with connect(node.url(user), open_timeout=10 * SCALE) as ws:
        next_of(ws, "welcome")
        ws.send(json.dumps({"type": "join_room", "room": room}))
        next_of(ws, "joined_room")
        yield ws


def test_a_person_chats_in_a_room_and_the_terminal_reconnects_after_a_restart(
    shoal: Shoal, terminal: Callable[..., Terminal]
) -> None:
    term = terminal(shoal.url("ann"))
    term.expect(r"\* connected to ws://127\.0\.0\.1:\d+/ws\?user_id=ann")
    term.expect(r'< \{\n    "type": "welcome",\n    "user_id": "ann"')
    term.type(b"/join lobby\n")
    term.expect(r'"type": "joined_room",\n    "room": "lobby"')
    with member(shoal, "bo", "lobby") as bo:
        term.expect(r'"type": "user_joined_room"')
        bo.send(json.dumps({"type": "room_message", "room": "lobby", "message": "hi ann"}))
        term.expect(r'"type": "room_message",\n    "from": "bo",')
        # Pretty and coloured on a terminal: the key bold blue, the string green.
        assert '\x1b[1;34m"message"\x1b[0m: \x1b[32m"hi ann"\x1b[0m' in term.raw.decode()
        term.type(b"/room lobby hi bo\n")
        assert next_of(bo, "room_message", **{"from": "ann"})["message"] == "hi bo"
        term.type(b"/binary 00 01 fe ff\n")  # the chat app echoes a binary frame
        term.expect(r"< binary, 4 bytes: 00 01 fe ff\n")
        term.type(b"/nope\n")  # a typo is not sent
        term.expect(r"\* unknown command /nope: /help lists them")

        shoal.stop()  # SIGTERM: every client is told 1001
        term.expect(r"\* disconnected: 1001 server shutting down; reconnecting")
    term.type(b"/room lobby typed while away\n")
    term.expect(r"\* not connected: queued, 1 waiting")
    shoal.start()
    back = term.expect(
        r"\* reconnected after (\d+\.\d)s \(rejoined lobby; sent 1 queued\)", timeout=30
    )
    assert float(back[1]) > 0
    # It keeps working: the room was joined again, and what is typed now goes out.
    with member(shoal, "cy", "lobby") as cy:
        term.type(b"/room lobby back again\n")
        assert next_of(cy, "room_message", **{"from": "ann"})["message"] == "back again"
    term.expect(r'"message": "back again"')
    term.type(b"\x04")  # Ctrl-D at the start of a line: the end of input
    term.expect(r"\* closed\n")
    assert term.wait() == 0


@dataclass
class Seen:
    """What the echo server saw of one connection."""

    headers: dict[str, str] = field(default_factory=dict)
    subprotocol: str | None = None
    received: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None
    done: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[str, list[Seen]]]:
    """A plain websockets server that echoes every message and records each connection:
    its handshake headers, what it received, the close code it got. It selects the first
    subprotocol offered, if any."""
    seen: list[Seen] = []

    def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        record = Seen({k.lower(): v for k, v in ws.request.headers.raw_items()}, ws.subprotocol)
        seen.append(record)
        for message in ws:
            record.received.append(message)
            # The client may close right after sending: what it sent before is still
            # read, and the echo is dropped.
            with contextlib.suppress(ConnectionClosed):
                ws.send(message)
        record.close_code = ws.close_code
        record.done.set()

    def first(ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        return offered[0] if offered else None

    with serve(handler, "127.0.0.1", 0, select_subprotocol=first) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}/", seen
        finally:
            server.shutdown()
            thread.join(5)


def test_ctrl_c_closes_with_1000_after_sending_the_token_headers_and_subprotocol(
    terminal: Callable[..., Terminal],
) -> None:
    with echo_server() as (url, seen):
        term = terminal(
            url, "--token", "t0k", "--header", "X-Trace: 42", "--subprotocol", "chat.v1",
            "--no-color",
        )  # fmt: skip
        term.expect(r"\* connected to ws://127\.0\.0\.1:\d+/ \(subprotocol chat\.v1\)")
        term.type(b"hello there\n")  # not JSON: sent, and shown back, as it is
        term.expect(r"\n< hello there\n")
        term.type(b'{"n": [1, true, null]}\n')
        term.expect(r'< \{\n    "n": \[\n      1,\n      true,\n      null\n    \]\n  \}\n')
        term.type(b"/help\n")  # shown, not sent
        term.expect(r"\* /join ROOM +join ROOM")
        term.expect(r"\n  /quit +close the connection and exit")
        term.type(b"\x03")  # Ctrl-C
        term.expect(r"\* closed\n")
        assert term.wait() == 0
        assert seen[0].done.wait(10 * SCALE)
    assert "\x1b[" not in term.raw.decode()  # --no-color
    (connection,) = seen
    assert connection.headers["authorization"] == "Bearer t0k"
    assert connection.headers["x-trace"] == "42"
    assert connection.subprotocol == "chat.v1"
    assert connection.received == ["hello there", '{"n": [1, true, null]}']
    assert connection.close_code == 1000


def test_json_through_pipes_gives_one_value_per_line_and_quit_closes_with_1000() -> None:
    """What a script sees: stdin and stdout are pipes; each reply is one JSON value per
    line; `/quit` closes with 1000 and what follows it is not sent."""
    with echo_server() as (url, seen):
        process = subprocess.Popen(
            [*SHOAL, "connect", "--json", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stdin is not None and process.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
        reader.start()
        process.stdin.write('{"type": "hello", "n": 1}\nplain text\n/binary 0102ff\n//slash\n\n')
        process.stdin.flush()
        # The replies come back before the script quits: a close right after sending would
        # race the echoes (a server answers a close at once, before what it still sends).
        wait_until(lambda: seen and len(seen[0].received) == 4, 10, "four messages sent")
        wait_until(lambda: len(lines) == 4, 10, "four replies printed")
        process.stdin.write("/quit\nafter\n")
        process.stdin.close()
        assert process.wait(timeout=30 * SCALE) == 0
        reader.join(5)
        stderr = process.stderr.read() if process.stderr else ""
        assert seen[0].done.wait(10 * SCALE)
    sent = ['{"type": "hello", "n": 1}', "plain text", b"\x01\x02\xff", "/slash"]
    assert seen[0].received == sent  # not "after"
    assert seen[0].close_code == 1000
    received = [json.loads(line) for line in lines]
    assert received == [{"type": "hello", "n": 1}, "plain text", {"binary": "0102ff"}, "/slash"]
    events = [json.loads(line) for line in stderr.splitlines()]
    assert [e["event"] for e in events if e["event"] != "queued"] == [
        "connected",
        "disconnected",
        "closed",
    ]
    assert events[-2:] == [
        {"event": "disconnected", "code": 1000, "reason": "", "reconnect": False},
        {"event": "closed", "code": 1000},
    ]


def test_the_end_of_input_closes_with_1000_after_sending_what_was_typed() -> None:
    """stdin ends at once: what was typed before still goes out, then a clean close."""
    with echo_server() as (url, seen):
        result = subprocess.run(
            [*SHOAL, "connect", "--json", url],
            input="one\ntwo\n", capture_output=True, text=True, timeout=30 * SCALE,
        )  # fmt: skip
        assert seen and seen[0].done.wait(10 * SCALE)
    assert result.returncode == 0, result.stderr
    assert seen[0].received == ["one", "two"]
    assert seen[0].close_code == 1000


def test_a_kick_ends_it_with_status_1_and_no_reconnection(
    chat: Shoal, sign: Sign, terminal: Callable[..., Terminal]
) -> None:
    term = terminal(f"ws://127.0.0.1:{chat.port}/ws", "--token", sign("target"))
    term.expect(r'"type": "authenticated",\n    "user_id": "target"')
    moderator = f"ws://127.0.0.1:{chat.port}/ws?token={sign('mod', 'moderator')}"
    with connect(moderator, open_timeout=10 * SCALE) as mod:
        next_of(mod, "authenticated")
        mod.send(json.dumps({"type": "kick_user", "user_id": "target", "reason": "spam"}))
        assert next_of(mod, "user_kicked")["connections"] == 1
    term.expect(r'"type": "kicked",\n    "by": "mod",\n    "reason": "spam"')
    term.expect(r"shoal connect: closed by the server: 4003 kicked\n")
    assert term.wait() == 1
    assert "reconnect" not in term.text()


def test_a_refused_token_a_closed_port_and_a_bad_url_fail_with_a_clear_message(
    chat: Shoal,
) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SHOAL, "connect", *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30 * SCALE,
        )  # fmt: skip

    url = f"ws://127.0.0.1:{chat.port}/ws"
    refused = run(url, "--token", "not.a.token")
    assert refused.returncode == 1
    assert refused.stderr == f"shoal connect: cannot connect to {url}: HTTP 401: malformed token\n"

    closed = f"ws://127.0.0.1:{free_port()}/ws"
    nobody = run("--json", closed)
    assert nobody.returncode == 1
    (failed,) = [json.loads(line) for line in nobody.stderr.splitlines()]
    assert failed["event"] == "failed"
    assert failed["message"].startswith(f"cannot connect to {closed}: ")
    assert nobody.stdout == ""

    for args, error in [
        (["http://127.0.0.1/ws"], "not a WebSocket URL (ws:// or wss://): 'http://127.0.0.1/ws'"),
        (["ws://"], "argument URL: ws:// isn't a valid URI"),
        ([url, "--header", "no colon"], "expected NAME:VALUE, got 'no colon'"),
    ]:
        bad = run(*args)
        assert bad.returncode == 2
        assert bad.stderr.startswith("usage: shoal connect")
        assert error in bad.stderr
