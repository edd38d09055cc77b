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

    Starts full: a new connection may send a whole burst at once. Each bucket is kept as
    the time at which it would be full again (the generic cell rate algorithm, the same
    bucket seen from the clock's side): one addition and one comparison per message,
    which is what a check run for every message can afford.
    """

    __slots__ = (
        "_byte_cost",
        "_byte_slack",
        "_bytes_full_at",
        "_message_cost",
        "_message_slack",
        "_messages_full_at",
        "_refused",
        "_window_ends",
        "rates",
    )

    def __init__(self, rates: Rates, now: float) -> None:
        self.rates = rates
        # Seconds of refill one message (one byte) costs, and how far ahead of the clock
        # a bucket may run before it is empty. No limit: it costs nothing.
        unlimited = float("inf")
        self._message_cost = 0.0 if rates.messages is None else 1.0 / rates.messages
        self._message_slack = (
            unlimited if rates.messages is None else rates.message_burst / rates.messages
        ) + _ROUNDING
        self._byte_cost = 0.0 if rates.bytes is None else 1.0 / rates.bytes
        self._byte_slack = (
            unlimited if rates.bytes is None else rates.byte_burst / rates.bytes
        ) + _ROUNDING
        self._messages_full_at = self._bytes_full_at = now
        self._refused = 0
        self._window_ends = 0.0

    def take(self, size: int, now: float) -> Verdict:
        """Account for one message of `size` payload bytes arriving at `now` (seconds,
        any monotonic clock). The caller must refuse it unless `Verdict.ALLOW`, and
        close the connection on `Verdict.CLOSE`."""
        full_at = self._messages_full_at
        messages = (full_at if full_at > now else now) + self._message_cost
        full_at = self._bytes_full_at
        size_cost = (full_at if full_at > now else now) + size * self._byte_cost
        if messages - now > self._message_slack or size_cost - now > self._byte_slack:
            return self._refuse(now)
        self._messages_full_at = messages
        self._bytes_full_at = size_cost
        return Verdict.ALLOW

    def _refuse(self, now: float) -> Verdict:
        if now >= self._window_ends:
            self._window_ends = now + self.rates.abuse_window
            self._refused = 0
        self._refused += 1
        return Verdict.CLOSE if self._refused >= self.rates.max_refused else Verdict.REFUSE


# Sums of many small costs drift by a few ulps: never refuse a message for that.
_ROUNDING = 1e-9
