"""A worker's task client against a real Redis: what a connection reads, in what order."""

from __future__ import annotations

import asyncio

import pytest

from shoal.core import envelope, jobs
from shoal.core.errors import TaskRefused
from shoal.core.keys import Keys
from shoal.core.resp import RedisAddress, Timeouts
from shoal.workers.dispatcher import Tasks

from support import RedisServer


def make(redis_server: RedisServer, prefix: str, limit: int = 100) -> Tasks:
    address = RedisAddress.from_url(redis_server.url)
    return Tasks(Keys(prefix), address, Timeouts(), {"add"}, limit)


async def test_an_outcome_arriving_before_its_dispatch_returned_waits_for_it(
    redis_server: RedisServer, prefix: str
) -> None:
    """The outcome travels on the bus, another Redis connection than the dispatch's: it
    can come first. The client must still read `task_dispatched` first."""
    tasks = make(redis_server, prefix)
    told: list[str] = []
    tasks.on_outcome = lambda cid, outcome: told.append(f"{cid}:{outcome.task_id}")
    await tasks.status("0-1")  # the connection is open: the dispatch below is one write

    async def handler() -> None:
        await tasks.dispatch("w.1", "ann", "add", [1, 2])
        told.append("dispatched")  # the chat app sends task_dispatched right then

    running = asyncio.ensure_future(handler())
    await asyncio.sleep(0)  # the dispatch is on its way; its reply not read yet
    tasks.done([envelope.TaskDone("9-0", "add", True, jobs.pack(3), ["w.1", "w.2"])])
    assert told == ["w.2:9-0"]  # w.2 has no dispatch in flight
    await running
    await asyncio.sleep(0)
    assert told == ["w.2:9-0", "dispatched", "w.1:9-0"]
    await tasks.close()


async def test_dispatch_refuses_unknown_tasks_bad_data_and_a_full_queue(
    redis_server: RedisServer, prefix: str
) -> None:
    tasks = make(redis_server, prefix, limit=1)
    with pytest.raises(TaskRefused, match="Unknown task: nope"):
        await tasks.dispatch("w.1", "ann", "nope", None)
    with pytest.raises(TaskRefused, match="Task data cannot be sent as msgpack"):
        await tasks.dispatch("w.1", "ann", "add", {"x": object()})
    task_id = await tasks.dispatch("w.1", "ann", "add", [1])
    with pytest.raises(TaskRefused, match=r"Task queue full \(1 tasks pending"):
        await tasks.dispatch("w.1", "ann", "add", [1])
    assert (await tasks.status(task_id)).state == "queued"
    assert not tasks.dispatching and not tasks.held
    await tasks.close()
