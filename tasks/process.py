"""One task pool process, as the master forks it: the queue consumer and its task
processes (`shoal.tasks.pool`), with the master's heartbeat.

On SIGTERM it stops taking jobs, lets the running ones finish within
`server.shutdown_timeout` (less a margin for the goodbye), hands the rest back to the
queue, stops its task processes and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

import uvloop

from shoal.core import loops, metrics
from shoal.core import task as task_api
from shoal.core.errors import BootError
from shoal.core.placement import Placement as ChildPlacement
from shoal.tasks.consumer import Consumer
from shoal.tasks.pool import Pool

logger = logging.getLogger(__name__)

EXIT_BOOT = 3
# Of `server.shutdown_timeout`, what is kept for stopping the task processes.
_STOP_MARGIN = 0.25


@dataclass(frozen=True, slots=True)
class Placement(ChildPlacement):
    """What the master gives the task pool process it forks."""

    processes: int


async def serve(placement: Placement) -> int:
    config = placement.config
    # A process group of its own: the master kills the whole group when this process
    # dies, so that no task process outlives it (they also exit when their input ends).
    os.setpgid(0, 0)
    tasks = task_api.load(config.tasks.modules)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pool = Pool(config, placement.redis_url, placement.processes)
    await pool.start()
    consumer = Consumer(
        config, placement.redis_url, f"{placement.node_id}.{os.getpid()}", pool, tasks
    )
    logger.info(
        "task pool: %d processes, %d jobs each at most, tasks: %s",
        placement.processes,
        config.tasks.concurrency,
        ", ".join(sorted(tasks)) or "none",
    )
    placement.scoreboard.set_ready(placement.seat)
    background = [
        loop.create_task(
            loops.beat(placement.scoreboard, placement.seat, placement.master_pid, stopping),
            name="beat",
        ),
        loop.create_task(consumer.take(), name="take"),
        loop.create_task(consumer.reclaim(), name="reclaim"),
        loop.create_task(consumer.renew(), name="renew"),
        loop.create_task(consumer.tidy(), name="tidy"),
        loop.create_task(consumer.measure(), name="measure"),
    ]
    status = 0 if await loops.until_stopped(stopping, background, "task pool") else 1
    consumer.stop_taking()
    background[2].cancel()  # no more taking over; renewing goes on while jobs finish
    await consumer.drain(config.server.shutdown_timeout * (1 - _STOP_MARGIN))
    for task in background:
        task.cancel()
    await pool.close()
    # What was counted since the last beat: the jobs that finished while draining.
    placement.scoreboard.metrics.publish(placement.seat, metrics.counters)
    return status


def run(placement: Placement) -> int:
    """Run the task pool in this (freshly forked) process. Returns its exit status."""
    try:
        return uvloop.run(serve(placement))
    except BootError as exc:
        logger.error("task pool cannot start: %s", exc)
        return EXIT_BOOT
