"""Retry delays with full jitter, for everything in shoal that tries again.

Exponential backoff alone keeps N workers on M nodes in lockstep: after a Redis restart
they would all reconnect in the same instant, every time. Full jitter (a delay drawn
uniformly from zero to the exponential cap) spreads them out (AWS Architecture Blog,
"Exponential Backoff And Jitter", 2015).
"""

from __future__ import annotations

import random


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """The delay before retry number `attempt` (0 for the first retry).

    Args:
        attempt: failures so far, less one.
        base: the cap of the first delay, in seconds.
        cap: no delay is longer than this.
        rng: the random source (a seeded one in tests).
    """
    ceiling = min(cap, base * 2 ** min(attempt, 32))
    return (rng or random).uniform(0, ceiling)
