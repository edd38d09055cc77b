"""The error root of shoal: every failure shoal raises on purpose is a `ShoalError`.

The protocol layer raises these; the I/O layer translates them, in one place, into an
error frame, a close code or an exit status.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Root of every error shoal raises on purpose."""


class ConfigError(ShoalError):
    """The configuration is invalid. The message names the key and the problem."""


class BootError(ShoalError):
    """A worker cannot start (port taken, application import failed, ...)."""


class ProtocolError(ShoalError):
    """A client message cannot be served; its text goes back in an error frame."""


class ServiceUnavailable(ProtocolError):
    """Redis cannot be reached right now; the client may retry."""

    def __init__(self, message: str = "Service unavailable") -> None:
        super().__init__(message)
