"""Redis error replies become typed shoal errors, chosen by the reply's first word."""

from __future__ import annotations

import pytest

from shoal.core.errors import (
    ProtocolError,
    RedisBusy,
    RedisLoading,
    RedisNoPermission,
    RedisOutOfMemory,
    RedisReadOnly,
    RedisReplyError,
    RedisUnavailable,
    ServiceUnavailable,
    ShoalError,
    reply_error,
)

REPLIES = [
    ("LOADING Redis is loading the dataset in memory", RedisLoading, True),
    ("BUSY Redis is busy running a script. You can only call SCRIPT KILL", RedisBusy, True),
    ("READONLY You can't write against a read only replica.", RedisReadOnly, True),
    ("OOM command not allowed when used memory > 'maxmemory'.", RedisOutOfMemory, True),
    ("NOPERM User shoal has no permissions to run the 'hset' command", RedisNoPermission, False),
    ("NOAUTH Authentication required.", RedisNoPermission, False),
    ("WRONGPASS invalid username-password pair or user is disabled.", RedisNoPermission, False),
    ("ERR unknown command 'FOO'", RedisReplyError, False),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", RedisReplyError, False),
    ("LOADINGX not the LOADING prefix", RedisReplyError, False),
    ("OOM", RedisOutOfMemory, True),  # a bare prefix, no text after it
    ("", RedisReplyError, False),
]


@pytest.mark.parametrize(("reply", "cls", "transient"), REPLIES)
def test_each_prefix_maps_to_its_class(
    reply: str, cls: type[RedisReplyError], transient: bool
) -> None:
    """The first word, whole, picks the class; the reply text is kept as Redis sent it."""
    error = reply_error(reply)
    assert type(error) is cls
    assert error.reply == reply
    assert error.transient is transient


@pytest.mark.parametrize(("reply", "cls", "transient"), REPLIES)
def test_reply_errors_are_service_unavailable_with_a_generic_client_text(
    reply: str, cls: type[RedisReplyError], transient: bool
) -> None:
    """Every reply error is a ServiceUnavailable (so a ProtocolError and a ShoalError).
    str() is Redis's own text, for the log; the exception's argument, which is what the
    worker sends a client (`ServiceUnavailable().args[0]`), stays the generic text, so no
    Redis detail (a user name, a key) reaches a client."""
    error = reply_error(reply)
    assert isinstance(error, ServiceUnavailable)
    assert isinstance(error, ProtocolError) and isinstance(error, ShoalError)
    assert str(error) == reply
    assert error.args == ("Service unavailable",)


def test_service_unavailable_texts() -> None:
    """What a client reads after a Redis failure, and what the unreachable branch says."""
    assert str(ServiceUnavailable()) == "Service unavailable"
    assert ServiceUnavailable().args[0] == "Service unavailable"
    assert str(RedisUnavailable()) == "Service unavailable"
    assert str(RedisUnavailable("connection refused")) == "connection refused"
    assert not issubclass(RedisUnavailable, RedisReplyError)
    assert not issubclass(RedisReplyError, RedisUnavailable)
