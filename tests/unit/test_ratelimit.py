"""Per-connection token buckets and the sustained-abuse rule, on a clock the test drives."""

from __future__ import annotations

import pytest

from shoal.config.model import LimitsConfig
from shoal.core.bus import largest_backlog
from shoal.workers.ratelimit import Allowance, Rates, Verdict

ALLOW, REFUSE, CLOSE = Verdict.ALLOW, Verdict.REFUSE, Verdict.CLOSE


def rates(**changes: object) -> Rates:
    settings = {
        "messages": 10.0,
        "message_burst": 5,
        "bytes": None,
        "byte_burst": 1000,
        "max_refused": 3,
        "abuse_window": 10.0,
        **changes,
    }
    return Rates(**settings)  # type: ignore[arg-type]


def test_a_burst_passes_then_messages_are_refused() -> None:
    """A quiet connection may send `burst` messages at once; the next is refused."""
    allowance = Allowance(rates(max_refused=100), now=0.0)
    assert [allowance.take(10, 0.0) for _ in range(6)] == [ALLOW] * 5 + [REFUSE]


def test_tokens_refill_at_the_rate() -> None:
    """At 10 per second, one message is allowed again every 0.1 s, and no sooner."""
    allowance = Allowance(rates(max_refused=100), now=0.0)
    for _ in range(5):
        allowance.take(1, 0.0)
    assert allowance.take(1, 0.05) is REFUSE
    assert allowance.take(1, 0.1) is ALLOW
    assert allowance.take(1, 0.1) is REFUSE
    # A long silence refills up to the burst, not beyond.
    assert [allowance.take(1, 100.0) for _ in range(6)] == [ALLOW] * 5 + [REFUSE]


def test_a_steady_client_under_the_rate_is_never_refused() -> None:
    """9 messages a second against a limit of 10, for a minute: all allowed."""
    allowance = Allowance(rates(message_burst=1), now=0.0)
    assert all(allowance.take(100, n / 9) is ALLOW for n in range(9 * 60))


def test_bytes_are_limited_on_their_own() -> None:
    """With 1000 bytes of burst at 1000 B/s, a 600-byte message passes, a second one waits
    0.2 s; a refused message takes no token of either kind."""
    allowance = Allowance(rates(messages=None, bytes=1000.0, max_refused=100), now=0.0)
    assert allowance.take(600, 0.0) is ALLOW
    assert allowance.take(600, 0.0) is REFUSE
    assert allowance.take(600, 0.19) is REFUSE
    assert allowance.take(600, 0.2) is ALLOW
    assert allowance.take(1, 0.2) is REFUSE


def test_a_message_needs_both_kinds_of_token() -> None:
    """Refused for bytes, a message leaves its message token; refused for messages, it
    leaves its bytes."""
    allowance = Allowance(rates(message_burst=2, bytes=100.0, byte_burst=100), now=0.0)
    assert allowance.take(90, 0.0) is ALLOW
    assert allowance.take(90, 0.0) is REFUSE  # bytes short; a message token is left
    assert allowance.take(10, 0.0) is ALLOW  # ...and taken now
    assert allowance.take(0, 0.0) is REFUSE  # no message token left


def test_no_limit_allows_everything() -> None:
    allowance = Allowance(rates(messages=None, bytes=None), now=0.0)
    assert all(allowance.take(10**6, 0.0) is ALLOW for _ in range(10_000))
    assert not rates(messages=None, bytes=None).enabled


def test_sustained_refusals_close() -> None:
    """The 3rd refusal within the 10 s window that the 1st opened closes."""
    allowance = Allowance(rates(message_burst=1, messages=0.001), now=0.0)
    assert allowance.take(1, 0.0) is ALLOW
    assert [allowance.take(1, t) for t in (1.0, 5.0, 10.9)] == [REFUSE, REFUSE, CLOSE]


def test_occasional_refusals_do_not_close() -> None:
    """Two refusals every 10 s, forever: each window expires before its third."""
    allowance = Allowance(rates(message_burst=1, messages=0.001), now=0.0)
    allowance.take(1, 0.0)
    times = [start + offset for start in range(0, 600, 11) for offset in (0, 1)]
    verdicts = [allowance.take(1, t) for t in times]
    assert set(verdicts) == {REFUSE}


def test_a_clock_going_backwards_refills_nothing() -> None:
    """Times from different reads may tie; an earlier one must not add or remove tokens."""
    allowance = Allowance(rates(max_refused=100), now=10.0)
    for _ in range(5):
        allowance.take(1, 10.0)
    assert allowance.take(1, 9.0) is REFUSE
    assert allowance.take(1, 10.15) is ALLOW


@pytest.mark.parametrize(
    ("limits", "enabled"),
    [
        (LimitsConfig(), True),
        (LimitsConfig(messages_per_second=None), True),
        (LimitsConfig(messages_per_second=None, bytes_per_second=None), False),
    ],
)
def test_rates_from_config(limits: LimitsConfig, enabled: bool) -> None:
    made = Rates.from_config(limits)
    assert made.enabled is enabled
    assert made.message_burst == limits.burst
    assert made.max_refused == limits.max_refused


def test_the_largest_backlog_is_read_from_client_list() -> None:
    """Only the deployment's subscribers count (by name), whatever else is connected."""
    listing = (
        b"id=3 addr=/s:0 name=app:sub:n.0.1 age=9 omem=0 tot-mem=22000 cmd=subscribe\n"
        b"id=4 addr=/s:0 name=app:sub:n.1.2 age=9 omem=4194304 tot-mem=4200000 cmd=ping\n"
        b"id=5 addr=/s:0 name=other:sub:x omem=99999999 cmd=subscribe\n"
        b"id=6 addr=/s:0 name= omem=88888888 cmd=subscribe\n"
    )
    assert largest_backlog(listing, b"app:sub:") == (4194304, 2)
    assert largest_backlog(b"", b"app:sub:") == (0, 0)
