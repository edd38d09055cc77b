"""The client's error tree: one root, `ClientError`, and a branch per way a talk with a
server fails.

As in websockets' own tree, "could not get in", "the peer went away" and "the input was
bad" are different branches, so that a caller can decide deliberately: retry, give up,
or fix its code.

```
ClientError
├── ConnectFailed              no connection: refused, DNS, TLS, handshake timed out
│   └── HandshakeRefused       the server answered the upgrade with an HTTP error
│       └── AuthenticationFailed   401: no valid token
├── TimedOut                   (also a TimeoutError) nothing came in time
├── ConnectionClosed           the connection is closed; `code`, `reason`, `advice`
├── ProtocolError              the server sent what the protocol does not allow here
├── ErrorReply                 an `{"type": "error"}` frame answered a request
│   └── TaskFailed             a `task_failed` answered a task request
├── QueueFull                  PersistentClient: the send queue is full ("raise" policy)
└── GaveUp                     PersistentClient: it stopped reconnecting; `cause` says why
```
"""

from __future__ import annotations

from shoal.core import schema


class ClientError(Exception):
    """Root of every error the shoal client raises on purpose."""


class ConnectFailed(ClientError):
    """No WebSocket connection could be opened (refused, unreachable, name not found, TLS
    failure, or no handshake within the timeout). The cause is chained (`__cause__`)."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"cannot connect to {url}: {message}")
        self.url = url


class HandshakeRefused(ConnectFailed):
    """The server answered the upgrade with an HTTP error instead of a WebSocket.

    Attributes:
        status: the HTTP status (400, 401, 403, 429, 503, ...).
        reason: the `reason` of shoal's JSON body (`token expired`, `banned`, ...), else
            the body's text, else the status phrase.
        retry_after: the `Retry-After` header in seconds, when the server sent one.
    """

    def __init__(self, url: str, status: int, reason: str, retry_after: float | None) -> None:
        super().__init__(url, f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class AuthenticationFailed(HandshakeRefused):
    """401: the token is missing, malformed, expired or not trusted. Retrying with the same
    token cannot succeed: get a new one."""


class TimedOut(ClientError, TimeoutError):
    """Nothing (or not the awaited reply) arrived within the timeout. The connection is
    still open: the caller may wait again."""


class ConnectionClosed(ClientError):
    """The connection is closed: by the server, by this client, or by the network.

    Attributes:
        code: the close code (1006 when the connection ended without a close frame).
        reason: the close reason the server sent (often empty).
        advice: what shoal's close-code table says to do next (`advice.reconnect`).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason
        self.advice = schema.advice(code)


class ProtocolError(ClientError):
    """The server sent something this call cannot accept: a binary frame where JSON was
    expected, text that is not JSON, or a broken WebSocket frame."""


class ErrorReply(ClientError):
    """The server answered a request with `{"type": "error", "message": ...}`. The
    connection stays open.

    Attributes:
        message: the server's error text (`Missing room`, `Permission denied`, ...).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TaskFailed(ErrorReply):
    """A task request ended with `task_failed`.

    Attributes:
        task_id: the job's id, from `task_dispatched`.
        type: the error type the task raised (`ValueError`, `TaskTimeout`, ...).
    """

    def __init__(self, task_id: str, type_: str, message: str) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.type = type_

    def __str__(self) -> str:
        return f"task {self.task_id} failed: {self.type}: {self.message}"


class QueueFull(ClientError):
    """`PersistentClient.send()` while disconnected, with `max_queue` messages queued and
    the `raise` policy. Nothing was queued: the caller decides what to drop."""


class GaveUp(ClientError):
    """The persistent client stopped for good: a close code or handshake refusal that
    reconnecting cannot fix (kicked, banned, token expired or refused), or
    `max_reconnect_attempts` failed attempts in a row. The cause is chained
    (`__cause__`: a `ConnectionClosed` or a `ConnectFailed`)."""
