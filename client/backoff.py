"""The persistent client's reconnect delays: exponential backoff with full jitter, and the
close-code table of `shoal.core.schema` deciding where the sequence starts.

Pure: no clock, no I/O. The random source is injected, so tests pin it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from shoal.core.schema import Reconnect


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays before reconnect attempts.

    Retry `n` (0 for the first after a drop, counting failed attempts in a row) waits a
    delay drawn uniformly from 0 to `min(max_delay, reconnect_delay * 2**n)` ("full
    jitter": thousands of clients dropped at once, by a node stopping, come back spread
    over the window instead of in the same instant).

    After a close the table advises to reconnect `PROMPTLY` (1001, 1012: the server is
    restarting and another worker is there already), retry 0 draws from
    `[0, reconnect_delay]`. After one that asks for `BACKOFF` (4000 slow consumer, 1011,
    1013, 1006 a dropped connection, a refused or failed handshake), the sequence starts
    one step further, `[0, 2 * reconnect_delay]`, and so on.

    Args:
        reconnect_delay: the ceiling of the first delay, in seconds.
        max_delay: no delay is longer.
        rng: the random source (`random.Random(seed)` in tests).
    """

    reconnect_delay: float = 1.0
    max_delay: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.reconnect_delay < 0 or self.max_delay < 0:
            raise ValueError("reconnect_delay and max_delay must not be negative")

    def ceiling(self, attempt: int, how: Reconnect) -> float:
        """The longest delay retry `attempt` may draw after a close advised as `how`."""
        step = attempt if how is Reconnect.PROMPTLY else attempt + 1
        # 2**64 seconds overflows nothing but is past any cap: stop doubling there.
        return min(self.max_delay, self.reconnect_delay * 2.0 ** min(step, 64))

    def delay(self, attempt: int, how: Reconnect) -> float:
        """The delay before retry `attempt` (0 for the first) after a close advised as
        `how`: uniform in `[0, ceiling(attempt, how)]`."""
        return self.rng.uniform(0, self.ceiling(attempt, how))
