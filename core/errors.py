"""The error root of shoal: every failure shoal raises on purpose is a `ShoalError`.

The protocol layer raises these; the I/O layer translates them, in one place, into an
error frame, a close code or an exit status.

Redis failures are translated at the client boundary (`shoal.core.resp`), so no caller
ever sees a hiredis or socket exception. Two branches, as in websockets' own tree: Redis
cannot be reached or answered too late (`RedisUnavailable`), and Redis answered with an
error (`RedisReplyError`). Both are `ServiceUnavailable` to a client. Each reply error
Redis sends while it is busy, loading, out of memory or a read-only replica has a class
of its own, so that callers decide deliberately: retry, degrade, or log and go on.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Root of every error shoal raises on purpose."""


class ConfigError(ShoalError):
    """The configuration is invalid. The message names the key and the problem."""


class BootError(ShoalError):
    """A worker cannot start for a reason that retrying does not fix (port taken,
    application import failed, ...)."""


class AlreadyRunning(ShoalError):
    """The pid file names a live shoal master: another one must not start over it."""


class NotRunning(ShoalError):
    """No shoal master runs where the pid file says: there is no pid file, or it names a
    process that is gone or is not a shoal master."""


class StatusUnavailable(ShoalError):
    """The master's status file is missing, unreadable, or of a version this shoal does
    not read."""


class ProtocolError(ShoalError):
    """A client message cannot be served; its text goes back in an error frame."""


class ServiceUnavailable(ProtocolError):
    """Redis cannot serve the request right now; the client may retry."""

    def __init__(self, message: str = "Service unavailable") -> None:
        super().__init__(message)


class RedisUnavailable(ServiceUnavailable):
    """Redis cannot be reached, the connection broke, or it stalled past its timeout."""


class RedisReplyError(ServiceUnavailable):
    """Redis answered a command with an error reply.

    Attributes:
        reply: the error text as Redis sent it, e.g. `OOM command not allowed ...`.
        transient: whether the same command may succeed later without anyone acting.
    """

    transient = False

    def __init__(self, reply: str) -> None:
        super().__init__()
        self.reply = reply

    def __str__(self) -> str:
        return self.reply


class RedisLoading(RedisReplyError):
    """`LOADING`: Redis is loading its dataset after a restart. Retry."""

    transient = True


class RedisBusy(RedisReplyError):
    """`BUSY`: a script is running too long. Retry."""

    transient = True


class RedisReadOnly(RedisReplyError):
    """`READONLY`: the server is a replica, e.g. mid-failover. Reconnect, then retry."""

    transient = True


class RedisOutOfMemory(RedisReplyError):
    """`OOM`: Redis reached `maxmemory`. Writes fail until memory is freed; reads work."""

    transient = True


class RedisNoPermission(RedisReplyError):
    """`NOPERM` / `NOAUTH` / `WRONGPASS`: the ACL user lacks a right. An operator must act."""


class EnvelopeError(ShoalError):
    """A bus message could not be decoded (a newer envelope version, or garbage)."""


_REPLY_ERRORS: dict[str, type[RedisReplyError]] = {
    "LOADING": RedisLoading,
    "BUSY": RedisBusy,
    "READONLY": RedisReadOnly,
    "OOM": RedisOutOfMemory,
    "NOPERM": RedisNoPermission,
    "NOAUTH": RedisNoPermission,
    "WRONGPASS": RedisNoPermission,
}


def reply_error(reply: str) -> RedisReplyError:
    """The shoal error for a Redis error reply, chosen by its first word."""
    return _REPLY_ERRORS.get(reply.partition(" ")[0], RedisReplyError)(reply)


class TaskRefused(ProtocolError):
    """A task cannot be dispatched: its name is unknown, or the queue is full
    (`tasks.max_pending`). The message says which, for the client."""


class TaskFailed(ShoalError):
    """A task ended in failure (`Tasks.wait()` raises it).

    Attributes:
        task_id: the job.
        type: the exception class name the task raised (`TaskTimeout` when it ran past
            its timeout, `TaskAbandoned` when its process kept dying under it).
        message: its text.
    """

    def __init__(self, task_id: str, type_: str, message: str) -> None:
        super().__init__(f"task {task_id} failed: {type_}: {message}")
        self.task_id = task_id
        self.type = type_
        self.message = message
