"""`shoal-connect URL` (and `shoal connect URL`): an interactive terminal client, like
`wscat -c`, on `PersistentClient`.

Each line typed on stdin goes out as a text frame, except the few commands of
`shoal.client.commands` (`/join ROOM`, `/help`, ...). What the server sends is printed by
`shoal.client.display`: pretty JSON for a person, JSON lines for scripts (`--json`).

It reconnects as the server's close code advises (`PersistentClient`), and says so: a
status line on each drop, each attempt and each reconnection, with the downtime. A close
that reconnecting cannot fix (kicked, banned, token expired) and a refused token end it
with status 1, and so does a first connection that fails: the server is not there, or
the URL is wrong. End of input (Ctrl-D) or `/quit` waits for what was typed to go out,
then closes with 1000, status 0; Ctrl-C (or SIGTERM) closes with 1000 at once, status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
from typing import Any

from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

from shoal.client import commands, wire
from shoal.client.display import Display, wants_color
from shoal.client.errors import (
    ClientError,
    ConnectFailed,
    ConnectionClosed,
    ErrorReply,
    GaveUp,
    QueueFull,
)
from shoal.client.persistent import (
    Connected,
    Disconnected,
    PersistentClient,
    Reconnected,
    Reconnecting,
)

EXIT_OK = 0
EXIT_FAILED = 1
"""The connection failed for good: the first one could not open, a token was refused,
or the server closed with a code that forbids reconnecting (kicked, banned, ...)."""
EXIT_INTERRUPTED = 130
"""A second Ctrl-C, while the first one's close was still under way."""
# (argparse exits with 2 for a usage error: an option or a URL it cannot take.)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments to `parser` (`shoal-connect`'s or `shoal connect`'s)."""
    parser.add_argument("url", metavar="URL", type=_url, help="ws:// or wss:// URL")
    parser.add_argument("--token", help="a JWT, sent as `Authorization: Bearer <token>`")
    parser.add_argument(
        "--header",
        action="append",
        type=_header,
        default=[],
        metavar="NAME:VALUE",
        help="an extra handshake header (repeat for more)",
    )
    parser.add_argument(
        "--subprotocol",
        action="append",
        default=[],
        metavar="NAME",
        help="offer this subprotocol (repeat for more)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="for scripts: each message as one JSON value per line on stdout, each status "
        "event as a JSON object per line on stderr",
    )
    parser.add_argument(
        "--no-color", action="store_true", help="no colours (nor with NO_COLOR set)"
    )


def _url(text: str) -> str:
    try:
        wire.check_url(text, None)
        parse_uri(text)
    except (ValueError, InvalidURI) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    """The `shoal-connect` console script."""
    parser = argparse.ArgumentParser(
        prog="shoal-connect",
        description="An interactive WebSocket client for shoal (or any WebSocket server): "
        "type lines to send them, see what the server sends. /help lists the commands.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv), parser.prog)


def run(args: argparse.Namespace, prog: str) -> int:
    """Run the client with the parsed arguments of `add_arguments`; return the exit
    status. `prog` names the program in error messages."""
    display = Display(
        sys.stdout,
        sys.stderr,
        prog=prog,
        json_lines=args.json,
        color_out=wants_color(sys.stdout, args.no_color, os.environ),
        color_err=wants_color(sys.stderr, args.no_color, os.environ),
    )
    try:
        return asyncio.run(_session(args, display))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _session(args: argparse.Namespace, display: Display) -> int:
    client = PersistentClient(
        args.url,
        token=args.token,
        headers=dict(args.header),
        subprotocols=args.subprotocol or None,
    )
    return await Terminal(client, display).run(sys.stdin.fileno())


class Terminal:
    """One run of the terminal client: typed lines go to `client`, what happens to
    `display`."""

    def __init__(self, client: PersistentClient, display: Display) -> None:
        """Create it in the event loop that runs it."""
        self.client = client
        self.display = display
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._opened = False  # a connection opened at least once
        self._started = asyncio.Event()  # start() returned: the first queue went out
        self._reconnected = asyncio.Event()
        self._interrupted = asyncio.Event()
        self._unreachable: asyncio.Future[ConnectFailed] = (
            asyncio.get_running_loop().create_future()
        )
        client.on("message", display.message)
        client.on("binary", display.binary)
        client.on("connected", self._connected)
        client.on("disconnected", self._disconnected)
        client.on("reconnecting", self._reconnecting)
        client.on("reconnected", self._on_reconnected)
        client.on("error", self._error)

    async def run(self, stdin: int) -> int:
        """Read lines from the file descriptor `stdin` and run until the end of input, a
        `/quit`, a signal, or a connection that fails for good. Returns the exit status."""
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=_read_lines, args=(stdin, loop, self._lines), daemon=True, name="stdin"
        ).start()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._interrupt, signum)
        connection = asyncio.create_task(self._connection())
        reading = asyncio.create_task(self._type())
        interrupted = asyncio.create_task(self._interrupted.wait())
        ends: set[asyncio.Future[Any]] = {connection, reading, interrupted, self._unreachable}
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reading.cancel()
            interrupted.cancel()
        if connection.done() or self._unreachable.done():
            # close() runs the callbacks of what came before (a `kicked` message) first.
            await self.client.close()
            error = connection.exception() if connection.done() else None
            cause = error.__cause__ if isinstance(error, GaveUp) else error
            return self._failed(cause or self._unreachable.result())
        await self.client.close(1000)
        with contextlib.suppress(GaveUp):  # it stopped on its own meanwhile: closed anyway
            await connection
        self.display.event("closed", "closed", code=1000)
        return EXIT_OK

    async def _connection(self) -> None:
        await self.client.start()  # raises GaveUp when the first attempt cannot succeed
        self._started.set()
        await self.client.wait_closed()

    async def _type(self) -> None:
        """Run each typed line until the end of input or `/quit`, then wait until what was
        typed has gone out."""
        while (line := await self._lines.get()) is not None:
            try:
                command = commands.parse(line)
            except ValueError as exc:
                self.display.event("error", str(exc), message=str(exc))
                continue
            if isinstance(command, commands.Quit):
                break
            if isinstance(command, commands.Help):
                self.display.event("help", commands.HELP, text=commands.HELP)
            elif command is not None:
                await self._send(command.data)
        await self._sent()

    async def _send(self, data: Any) -> None:
        try:
            if not await self.client.send(data):
                waiting = self.client.queued
                text = f"not connected: queued, {waiting} waiting"
                self.display.event("queued", text, queued=waiting)
        except QueueFull as exc:
            self.display.event("error", f"not sent: {exc}", message=f"not sent: {exc}")
        except ConnectionClosed:
            pass  # it stopped for good: run() reports why and ends

    async def _sent(self) -> None:
        """Wait until nothing typed waits for a connection: the first connection opened
        and sent the queue, and so did every reconnection since that left one."""
        await self._started.wait()
        while self.client.queued:
            # Something is queued, so the reconnection that sends it has not finished:
            # its `reconnected` event comes after this.
            self._reconnected.clear()
            await self._reconnected.wait()

    def _interrupt(self, signum: int) -> None:
        """The first Ctrl-C closes cleanly; a second one interrupts that too."""
        asyncio.get_running_loop().remove_signal_handler(signum)
        self._interrupted.set()

    def _failed(self, cause: BaseException) -> int:
        if isinstance(cause, ConnectionClosed):
            self.display.failure(f"closed by the server: {cause.code} {cause.reason}".rstrip())
        else:
            self.display.failure(str(cause))
        return EXIT_FAILED

    # The client's events

    def _connected(self, event: Connected) -> None:
        self._opened = True
        if event.reconnection:
            return  # `reconnected` follows, once the rooms are joined again
        protocol = f" (subprotocol {event.subprotocol})" if event.subprotocol else ""
        self.display.event(
            "connected",
            f"connected to {event.url}{protocol}",
            url=event.url,
            subprotocol=event.subprotocol,
        )

    def _disconnected(self, event: Disconnected) -> None:
        reason = event.reason or event.advice.reason
        # For a person, a close that ends the program is told by its failure line.
        text = f"disconnected: {event.code} {reason}; reconnecting" if event.reconnect else None
        self.display.event(
            "disconnected",
            text,
            code=event.code,
            reason=event.reason,
            reconnect=event.reconnect,
        )

    def _reconnecting(self, event: Reconnecting) -> None:
        if not self._opened:
            return  # the first attempt failed: the program ends, it does not retry
        self.display.event(
            "reconnecting",
            f"reconnecting in {event.delay:.1f}s (attempt {event.attempt})",
            attempt=event.attempt,
            delay=round(event.delay, 3),
        )

    def _on_reconnected(self, event: Reconnected) -> None:
        details = [f"rejoined {', '.join(event.rejoined)}"] if event.rejoined else []
        if event.resubscribed:
            details.append(f"resubscribed {', '.join(event.resubscribed)}")
        if event.sent:
            details.append(f"sent {event.sent} queued")
        if event.dropped:
            details.append(f"dropped {event.dropped} queued")
        suffix = f" ({'; '.join(details)})" if details else ""
        self.display.event(
            "reconnected",
            f"reconnected after {event.downtime:.1f}s{suffix}",
            downtime=round(event.downtime, 3),
            attempts=event.attempts,
            rejoined=list(event.rejoined),
            resubscribed=list(event.resubscribed),
            sent=event.sent,
            dropped=event.dropped,
        )
        self._reconnected.set()

    def _error(self, error: BaseException) -> None:
        if isinstance(error, ErrorReply):
            return  # the error frame itself was printed as a message
        if isinstance(error, ConnectFailed) and not self._opened:
            if not self._unreachable.done():
                self._unreachable.set_result(error)
            return
        text = str(error) if isinstance(error, ClientError) else f"error: {error!r}"
        self.display.event("error", text, message=text)


def _read_lines(fd: int, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
    """Read `fd` until its end, in a thread; hand each line (without its newline) to
    `lines` on `loop`, then None.

    A thread, because no event loop can watch every stdin: epoll refuses a regular file
    (`< input.txt`). os.read, not sys.stdin: a thread blocked in sys.stdin's buffered
    reader holds its lock, which the interpreter's exit then waits for in vain.
    """

    def hand(line: str | None) -> bool:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        except RuntimeError:  # the loop is closed: the program is ending
            return False
        return True

    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal went away
            chunk = b""
        if not chunk:
            break
        *complete, pending = (pending + chunk).split(b"\n")
        for raw in complete:
            if not hand(_decode(raw)):
                return
    if pending:
        hand(_decode(pending))
    hand(None)


def _decode(raw: bytes) -> str:
    return raw.decode(errors="replace").removesuffix("\r")


if __name__ == "__main__":
    sys.exit(main())
