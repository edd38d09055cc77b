"""Per-connection rate limits: token buckets for messages and payload bytes, and the rule
that turns sustained refusals into a close. Pure: the caller passes the clock in.

A bucket holds up to `burst` tokens and refills at `rate` tokens per second; a message
takes one message token and one byte token per byte of its payload, from both buckets or
from neither. A message that finds either bucket short is refused, and costs nothing.

Sustained abuse: the first refusal opens a window of `abuse_window` seconds; the
`max_refused`-th refusal inside it ends the connection (`Verdict.CLOSE`). A window with
fewer refusals expires, and the next refusal opens a new one. So a client that goes over
its rate now and then only sees errors, and one that keeps sending after them is closed
within `abuse_window` seconds, having cost at most `max_refused` cheap refusals.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shoal.config.model import LimitsConfig


class Verdict(enum.IntEnum):
    """What becomes of one message."""

    ALLOW = 0
    REFUSE = 1
    """Answered with an error; the message has no effect."""
    CLOSE = 2
    """Refused, and the connection is closed (sustained abuse)."""


@dataclass(frozen=True, slots=True)
class Rates:
    """The limits every connection of a worker gets (`limits.*`). None: no limit.

    Attributes:
        messages: messages per second, refilled continuously.
        message_burst: messages a connection may send at once after being quiet.
        bytes: payload bytes per second.
        byte_burst: payload bytes a connection may send at once.
        max_refused: refusals within `abuse_window` that close the connection.
        abuse_window: seconds; see the module docstring.
    """

    messages: float | None
    message_burst: int
    bytes: float | None
    byte_burst: int
    max_refused: int
    abuse_window: float

    @classmethod
    def from_config(cls, limits: LimitsConfig) -> Rates:
        return cls(
            messages=limits.messages_per_second,
            message_burst=limits.burst,
            bytes=limits.bytes_per_second,
            byte_burst=limits.bytes_burst,
            max_refused=limits.max_refused,
            abuse_window=limits.abuse_window,
        )

    @property
    def enabled(self) -> bool:
        return self.messages is not None or self.bytes is not None


class Allowance:
    """What one connection may still send, by the rates of `Rates`.

    Starts full: a new connection may send a whole burst at once.
    """

    __slots__ = ("_bytes", "_messages", "_refused", "_stamp", "_window_ends", "rates")

    def __init__(self, rates: Rates, now: float) -> None:
        self.rates = rates
        self._messages = float(rates.message_burst)
        self._bytes = float(rates.byte_burst)
        self._stamp = now
        self._refused = 0
        self._window_ends = 0.0

    def take(self, size: int, now: float) -> Verdict:
        """Account for one message of `size` payload bytes arriving at `now` (seconds,
        any monotonic clock). The caller must refuse it unless `Verdict.ALLOW`, and
        close the connection on `Verdict.CLOSE`."""
        rates = self.rates
        elapsed = now - self._stamp
        if elapsed > 0:
            self._stamp = now
        else:
            elapsed = 0.0
        messages = self._messages
        if rates.messages is not None:
            messages = min(rates.message_burst, messages + elapsed * rates.messages)
            self._messages = messages
        available = self._bytes
        if rates.bytes is not None:
            available = min(rates.byte_burst, available + elapsed * rates.bytes)
            self._bytes = available
        if (rates.messages is None or messages >= 1.0) and (
            rates.bytes is None or available >= size
        ):
            if rates.messages is not None:
                self._messages = messages - 1.0
            if rates.bytes is not None:
                self._bytes = available - size
            return Verdict.ALLOW
        return self._refuse(now)

    def _refuse(self, now: float) -> Verdict:
        if now >= self._window_ends:
            self._window_ends = now + self.rates.abuse_window
            self._refused = 0
        self._refused += 1
        return Verdict.CLOSE if self._refused >= self.rates.max_refused else Verdict.REFUSE
