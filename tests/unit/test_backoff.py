"""Full-jitter retry delays: drawn from [0, ceiling], the ceiling doubling up to the cap."""

from __future__ import annotations

import random

import pytest

from shoal.core.backoff import full_jitter

# base 0.1 s, cap 2 s: the ceiling of each attempt, written out.
CEILINGS = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]


@pytest.mark.parametrize(("attempt", "ceiling"), list(enumerate(CEILINGS)))
def test_each_attempt_draws_within_its_ceiling(attempt: int, ceiling: float) -> None:
    """Every delay lies in [0, ceiling], and the draws cover that whole range (full jitter,
    not equal jitter: some retries go almost at once)."""
    rng = random.Random(attempt)
    delays = [full_jitter(attempt, 0.1, 2.0, rng) for _ in range(500)]
    assert all(0.0 <= delay <= ceiling for delay in delays)
    assert min(delays) < 0.05 * ceiling
    assert max(delays) > 0.95 * ceiling


def test_the_cap_bounds_every_delay() -> None:
    """Whatever the base, no delay is longer than the cap."""
    rng = random.Random(0)
    delays = [full_jitter(attempt, 5.0, 3.0, rng) for attempt in range(50) for _ in range(20)]
    assert max(delays) <= 3.0
    assert max(delays) > 2.9


@pytest.mark.parametrize("attempt", [33, 1024, 10**6, 10**100])
def test_huge_attempt_numbers_do_not_overflow(attempt: int) -> None:
    """A retry loop that has run for days still gets a delay within the cap."""
    delay = full_jitter(attempt, 0.1, 30.0, random.Random(1))
    assert 0.0 <= delay <= 30.0


def test_seeded_rng_makes_delays_reproducible() -> None:
    """The same seed gives the same delays; without an rng, the module's random is used."""
    first = [full_jitter(n, 0.5, 8.0, random.Random(42)) for n in range(10)]
    second = [full_jitter(n, 0.5, 8.0, random.Random(42)) for n in range(10)]
    assert first == second
    assert 0.0 <= full_jitter(3, 0.5, 8.0) <= 4.0
