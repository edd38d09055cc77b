"""The persistent client's reconnect delays: the sequence, its cap and its jitter bounds,
pure and then through the real reconnect loop against a port that refuses."""

from __future__ import annotations

import random

import pytest

from shoal.client import Backoff, ConnectFailed, GaveUp, PersistentClient, Reconnecting
from shoal.core.schema import Reconnect

from support import free_port


class Edge(random.Random):
    """A random source pinned to one end of each range. A test double for the one thing
    that cannot be made real here: chance."""

    def __init__(self, upper: bool) -> None:
        super().__init__(0)
        self.upper = upper

    def uniform(self, a: float, b: float) -> float:
        return b if self.upper else a


def test_the_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    top = Backoff(1.0, 30.0, Edge(upper=True))
    assert [top.delay(n, Reconnect.PROMPTLY) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    # A close that asks for backoff (4000, 1011, 1006, a failed attempt) starts one step on.
    assert [top.delay(n, Reconnect.BACKOFF) for n in range(6)] == [2, 4, 8, 16, 30, 30]
    assert top.delay(10_000, Reconnect.BACKOFF) == 30  # no overflow, however long
    bottom = Backoff(1.0, 30.0, Edge(upper=False))
    assert {bottom.delay(n, how) for n in range(8) for how in Reconnect} == {0}


def test_full_jitter_spreads_every_delay_over_its_whole_window() -> None:
    backoff = Backoff(0.5, 8.0, random.Random(2024))
    for attempt in range(6):
        for how in (Reconnect.PROMPTLY, Reconnect.BACKOFF):
            ceiling = backoff.ceiling(attempt, how)
            draws = [backoff.delay(attempt, how) for _ in range(2000)]
            assert all(0 <= d <= ceiling for d in draws)
            # Spread over the window, not bunched: a thousand clients dropped at once
            # come back over the whole of it.
            assert min(draws) < 0.05 * ceiling and max(draws) > 0.95 * ceiling
            assert abs(sum(draws) / len(draws) - ceiling / 2) < 0.05 * ceiling


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Backoff(-1.0, 30.0)
    with pytest.raises(ValueError, match="queue_policy"):
        PersistentClient("ws://127.0.0.1:1/ws", queue_policy="drop_newest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a WebSocket URL"):
        PersistentClient("http://127.0.0.1:1/ws")


async def test_the_reconnect_loop_follows_the_sequence_then_gives_up() -> None:
    """Against a port nothing listens on (each attempt a real refused connection), with
    the delays pinned to their ceilings and a sleep that only records them."""
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    pc = PersistentClient(
        f"ws://127.0.0.1:{free_port()}/ws",
        reconnect_delay=1.0,
        max_delay=10.0,
        max_reconnect_attempts=5,
        rng=Edge(upper=True),
        sleep=record,
    )
    announced: list[Reconnecting] = []
    failures: list[BaseException] = []
    pc.on("reconnecting", announced.append)
    pc.on("error", failures.append)
    with pytest.raises(GaveUp) as caught:
        await pc.start()
    await pc.close()
    assert delays == [2, 4, 8, 10, 10]
    assert [(r.attempt, r.delay) for r in announced] == list(enumerate(delays, start=1))
    assert len(failures) == 6 and all(isinstance(f, ConnectFailed) for f in failures)
    assert isinstance(caught.value.__cause__, ConnectFailed)
    assert isinstance(caught.value.__cause__.__cause__, ConnectionRefusedError)
