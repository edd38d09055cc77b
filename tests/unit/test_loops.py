"""Supervision of a child's background loops: none may die silently."""

from __future__ import annotations

import asyncio
import os

import pytest

from shoal.core import loops
from shoal.core.scoreboard import Scoreboard


async def test_a_loop_that_dies_ends_the_wait_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def heartbeat() -> None:
        raise ConnectionResetError("boom")

    async def forever() -> None:
        await asyncio.Event().wait()

    stopping = asyncio.Event()
    background = [
        asyncio.create_task(heartbeat(), name="heartbeat"),
        asyncio.create_task(forever(), name="forever"),
    ]
    assert await loops.until_stopped(stopping, background, "worker w1") is False
    assert (
        "worker w1: background loop 'heartbeat' ended (ConnectionResetError('boom'))" in caplog.text
    )
    assert "Traceback" in caplog.text  # where it died, not just that it did
    background[1].cancel()


async def test_a_loop_that_returns_counts_as_dead_too(caplog: pytest.LogCaptureFixture) -> None:
    async def quits() -> None:
        return

    assert not await loops.until_stopped(asyncio.Event(), [asyncio.create_task(quits())], "x")
    assert "ended (None)" in caplog.text


async def test_being_told_to_stop_is_not_a_failure() -> None:
    stopping = asyncio.Event()

    async def forever() -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(forever())
    asyncio.get_running_loop().call_soon(stopping.set)
    assert await loops.until_stopped(stopping, [task], "x") is True
    assert not task.done()  # the caller decides what to cancel
    task.cancel()


async def test_beat_writes_the_scoreboard_and_stops_an_orphan() -> None:
    board = Scoreboard(2)
    stopping = asyncio.Event()
    beat = asyncio.create_task(loops.beat(board, 1, master_pid=os.getppid(), stopping=stopping))
    await asyncio.sleep(0)
    assert board.last_beat(1) > 0 and board.last_beat(0) == 0
    assert not stopping.is_set()
    beat.cancel()
    # A master pid that is not our parent's: the master is gone, this process must stop.
    orphan = asyncio.create_task(loops.beat(board, 0, master_pid=-1, stopping=stopping))
    await asyncio.sleep(0)
    assert stopping.is_set()
    orphan.cancel()
