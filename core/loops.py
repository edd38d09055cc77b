"""The background loops every child process of the master runs, and their supervision.

A loop that dies silently is the worst failure a long-running process can have: a
worker whose Redis heartbeat loop died kept serving while other nodes swept its state
as dead. So every loop of a child runs under `until_stopped()`, and one that ends makes
the process exit, for the master to replace it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from shoal.core import metrics
from shoal.core.scoreboard import Scoreboard

logger = logging.getLogger(__name__)

BEAT_PERIOD = 1.0


async def beat(scoreboard: Scoreboard, seat: int, master_pid: int, stopping: asyncio.Event) -> None:
    """Tell the master, through the scoreboard, that this event loop runs; publish this
    process's counters (`shoal.core.metrics`); stop if the master is gone (this process
    was re-parented)."""
    while True:
        scoreboard.beat(seat, time.monotonic())
        scoreboard.metrics.publish(seat, metrics.counters)
        if os.getppid() != master_pid:
            logger.error("master process is gone; stopping")
            stopping.set()
        await asyncio.sleep(BEAT_PERIOD)


async def until_stopped(
    stopping: asyncio.Event, loops: list[asyncio.Task[None]], owner: str
) -> bool:
    """Wait until `stopping` is set, or until one of `loops` ends.

    Returns:
        True when told to stop; False when a loop ended first, which is logged with its
        traceback: the caller must then exit with a failure status.
    """
    stop = asyncio.create_task(stopping.wait(), name="stop")
    done, _ = await asyncio.wait([stop, *loops], return_when=asyncio.FIRST_COMPLETED)
    if stop in done:
        return True
    stop.cancel()
    for task in done:
        error = None if task.cancelled() else task.exception()
        logger.error(
            "%s: background loop %r ended (%r); exiting so the master replaces it",
            owner,
            task.get_name(),
            error,
            exc_info=error,
        )
    return False
