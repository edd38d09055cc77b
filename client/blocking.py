"""`Client`: a blocking WebSocket client for shoal, for scripts, tests and code without an
event loop. One connection, opened by the constructor; every call waits at most `timeout`.

It runs on websockets' threading client (`websockets.sync.client`): no event loop, safe
to call from one thread at a time.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import time
from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

from websockets.exceptions import ConnectionClosed as WebSocketClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from shoal.client import wire
from shoal.client.errors import ConnectionClosed, ErrorReply, TaskFailed, TimedOut

Opcode = Literal["text", "binary"]


class Client:
    """A blocking connection to a shoal server (or any WebSocket server).

    Args:
        url: `ws://` or `wss://` URL, e.g. `ws://127.0.0.1:9501/ws?user_id=ann`.
        timeout: seconds each call waits by default (connecting, receiving, a ping, a
            request, the closing handshake).
        headers: extra request headers of the handshake.
        ssl: the TLS context for `wss://` (a private CA, a client certificate); the
            system's default context when left out.
        subprotocols: offered in `Sec-WebSocket-Protocol`; the one the server picked is
            `subprotocol`.
        token: a JWT, sent as `Authorization: Bearer <token>`.

    Raises:
        ValueError: the URL is not `ws://` or `wss://`, or `ssl` came with `ws://`.
        ConnectFailed: no connection (`HandshakeRefused` with the HTTP status when the
            server refused the upgrade, `AuthenticationFailed` for 401).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 60,
        *,
        headers: Mapping[str, str] | None = None,
        ssl: ssl.SSLContext | None = None,
        subprotocols: Sequence[str] | None = None,
        token: str | None = None,
    ) -> None:
        wire.check_url(url, ssl)
        self.url = url
        self.timeout = timeout
        self.last_opcode: Opcode | None = None
        """Whether the last message `receive()` returned was text or binary."""
        # Messages read by `request()` while it waited for its reply, for `receive()`.
        self._held: deque[wire.Data] = deque()
        # Tasks sent with `send()` whose `task_dispatched` was not read yet: a task
        # `request()` must not take theirs for its own.
        self._dispatching = 0
        # websockets wants its connection used as a context manager (it will connect on
        # entry in a later version): the stack enters it now and exits it in close().
        self._stack = contextlib.ExitStack()
        try:
            self._ws: ClientConnection = self._stack.enter_context(
                connect(
                    url,
                    ssl=ssl,
                    additional_headers=wire.handshake_headers(headers, token),
                    subprotocols=[Subprotocol(p) for p in subprotocols or ()] or None,
                    open_timeout=timeout,
                    close_timeout=timeout,
                    # The server pings (server.heartbeat_check_interval) and this end answers;
                    # a blocking client that sits between calls must not be cut by its own pings.
                    ping_interval=None,
                )
            )
        except Exception as exc:
            raise wire.connect_failed(url, exc) from exc

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the server selected, or None."""
        return self._ws.subprotocol

    @property
    def close_code(self) -> int | None:
        """The close code once the connection is closed (1006: no close frame), else None."""
        return self._ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self._ws.close_reason

    def send(self, data: Any) -> None:
        """Send one message: a str as text, bytes as binary, a dict or a list as JSON text.

        Raises:
            TypeError: any other type (nothing is sent).
            ConnectionClosed: the connection is closed.
        """
        frame = wire.encode(data)
        self._send(frame)
        if isinstance(data, dict) and data.get("type") == "task":
            self._dispatching += 1

    def _send(self, frame: wire.Data) -> None:
        try:
            self._ws.send(frame)
        except WebSocketClosed as exc:
            raise wire.closed(exc) from exc

    def receive(self, timeout: float | None = None) -> wire.Data:
        """The next message: str for text, bytes for binary (`last_opcode` says which).

        Args:
            timeout: seconds to wait; `self.timeout` when None.

        Raises:
            TimedOut: nothing came in time (the connection stays open).
            ConnectionClosed: the connection is closed, with the server's code and reason.
            ProtocolError: the server broke the WebSocket protocol (the connection is
                then closed with 1002 or 1007).
        """
        if self._held:
            data = self._held.popleft()
        else:
            data = self._read(self._deadline(timeout))
            if self._dispatching and _json_type(data) == "task_dispatched":
                self._dispatching -= 1
        self.last_opcode = "text" if isinstance(data, str) else "binary"
        return data

    def receive_json(self, timeout: float | None = None) -> Any:
        """The next message, decoded from JSON.

        Raises:
            ProtocolError: the message was binary or not JSON (it is consumed).
            TimedOut, ConnectionClosed: as `receive()`.
        """
        return wire.decode_json(self.receive(timeout))

    def request(
        self, message: Mapping[str, Any], reply_type: str, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send `message` and return the first JSON message of type `reply_type` after it.

        Messages of other types that arrive meanwhile are kept, in order, for `receive()`.
        shoal answers one connection's messages in order and errors carry no request id,
        so an `error` frame before the reply is taken as the answer to `message`.

        A `task` message with `reply_type="task_result"` waits for its `task_dispatched`,
        then for the `task_result` with that `task_id` (other tasks' outcomes are kept).

        Raises:
            ErrorReply: the server answered with an error frame.
            TaskFailed: the task ended with `task_failed`.
            TimedOut: no reply within `timeout` (`self.timeout` when None), for the whole
                exchange.
            ConnectionClosed, ProtocolError: as `receive()`.
        """
        deadline = self._deadline(timeout)
        self._send(wire.encode(dict(message)))
        two_stages = message.get("type") == "task" and reply_type == "task_result"
        expected = "task_dispatched" if two_stages else reply_type
        task_id: str | None = None
        kept: list[wire.Data] = []
        try:
            while True:
                raw = self._read(deadline)
                reply = _json_object(raw)
                kind = reply.get("type") if reply is not None else None
                if reply is None:
                    kept.append(raw)
                elif task_id is None and kind == "error":
                    raise ErrorReply(str(reply.get("message")))
                elif kind == "task_dispatched" and self._dispatching:
                    self._dispatching -= 1  # the reply to a task sent before this request
                    kept.append(raw)
                elif task_id is None and kind == expected and wire.answers(message, reply):
                    if not two_stages:
                        return reply
                    task_id = str(reply.get("task_id"))
                elif task_id is not None and reply.get("task_id") == task_id:
                    if kind == "task_result":
                        return reply
                    if kind == "task_failed":
                        error = reply.get("error") or {}
                        raise TaskFailed(task_id, str(error.get("type")), str(error.get("message")))
                    kept.append(raw)
                else:
                    kept.append(raw)
        finally:
            self._held.extend(kept)

    def ping(self, timeout: float | None = None) -> float:
        """Send a WebSocket ping and wait for its pong; return the round trip in seconds.

        Raises:
            TimedOut: no pong in time.
            ConnectionClosed: the connection is closed.
        """
        limit = self.timeout if timeout is None else timeout
        start = time.monotonic()
        try:
            pong = self._ws.ping()
        except WebSocketClosed as exc:
            raise wire.closed(exc) from exc
        if not pong.wait(limit):
            if self._ws.close_code is not None:
                raise ConnectionClosed(self._ws.close_code, self._ws.close_reason or "")
            raise TimedOut(f"no pong within {limit:g}s")
        return time.monotonic() - start

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection with `code` and `reason` and wait for the server's answer
        (at most `timeout`). Closing a closed client does nothing."""
        self._ws.close(code, reason)
        self._stack.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _read(self, deadline: float) -> wire.Data:
        remaining = deadline - time.monotonic()
        try:
            return self._ws.recv(timeout=max(0.0, remaining))
        except TimeoutError as exc:
            raise TimedOut("no message within the timeout") from exc
        except WebSocketClosed as exc:
            raise wire.closed(exc) from exc


def _json_type(raw: wire.Data) -> Any:
    value = _json_object(raw)
    return None if value is None else value.get("type")


def _json_object(raw: wire.Data) -> dict[str, Any] | None:
    """`raw` decoded, when it is a JSON object; else None (binary, not JSON, an array)."""
    if not isinstance(raw, str):
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
