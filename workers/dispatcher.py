"""Tasks from a WebSocket worker's side: dispatch a job, learn how it ended (Swoole's
`task()`, `taskwait()` and `taskWaitMulti()`).

A dispatch is one Redis round trip (`shoal.core.jobs.dispatch`); the outcome comes back
on the bus, to the worker of the connection that dispatched the job (`TaskDone`), which
hands it to the application (`on_task_result`) or sends it to the client. `wait()` also
reads the job's record once a second, so that it learns the outcome of a job dispatched
from another worker, or one whose bus message was lost with a Redis connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterable
from typing import Any

from shoal.core import envelope, jobs
from shoal.core.errors import TaskFailed, TaskRefused
from shoal.core.keys import Keys
from shoal.core.resp import Client, RedisAddress, Timeouts

_POLL = 1.0

# Called with (connection id, outcome) for each local recipient of an outcome.
OnOutcome = Callable[[str, jobs.Outcome], None]


class Tasks:
    """One worker's access to the task queue.

    Args:
        keys: key names.
        address: the Redis shared with the task pools.
        timeouts: `redis.*`.
        names: the tasks registered (`tasks.modules`); others are refused at once.
        limit: `tasks.max_pending`.
    """

    def __init__(
        self,
        keys: Keys,
        address: RedisAddress,
        timeouts: Timeouts,
        names: Collection[str],
        limit: int,
    ) -> None:
        self.keys = keys
        # Outcomes are msgpack: this connection keeps replies as bytes. It opens on the
        # first dispatch, so a worker whose application never dispatches has none.
        self.redis = Client(address, timeouts, encoding=None)
        self.names = frozenset(names)
        self.limit = limit
        self.waiters: dict[str, list[asyncio.Future[jobs.Outcome]]] = {}
        self.on_outcome: OnOutcome | None = None
        # A job's outcome comes back on the bus, another Redis connection than the one
        # its dispatch went on: it may arrive before the dispatch's reply. Outcomes for a
        # connection with a dispatch in flight are held until that dispatch returned, so
        # that a client reads `task_dispatched` before the `task_result` it announces.
        self.dispatching: dict[str, int] = {}
        self.held: dict[str, list[jobs.Outcome]] = {}

    async def dispatch(self, conn_id: str, user_id: str, name: str, data: Any) -> str:
        """Queue a job for the task pools; return its task id at once.

        Raises:
            TaskRefused: unknown task, data msgpack cannot carry, or the queue is full.
            ServiceUnavailable: Redis failed; nothing was queued.
        """
        if name not in self.names:
            raise TaskRefused(f"Unknown task: {name}")
        try:
            packed = jobs.pack(data)
        except TypeError as exc:
            raise TaskRefused(f"Task data {exc}") from exc
        self.dispatching[conn_id] = self.dispatching.get(conn_id, 0) + 1
        try:
            task_id = await self.redis.execute(
                *jobs.dispatch(
                    self.keys, name, packed, conn=conn_id, user=user_id, limit=self.limit
                )
            )
        finally:
            self._dispatched(conn_id)
        if task_id is None:
            raise TaskRefused(
                f"Task queue full ({self.limit} tasks pending, tasks.max_pending); try later"
            )
        return task_id.decode() if isinstance(task_id, bytes) else str(task_id)

    async def status(self, task_id: str, *, user: str | None = None) -> jobs.Status:
        """Where the job stands: queued, running, done or failed (with its outcome), or
        unknown (never dispatched, or its outcome expired after `tasks.result_ttl`;
        with `user`, also when another user dispatched it).

        Raises:
            ServiceUnavailable: Redis failed.
        """
        replies = await self.redis.pipeline(jobs.status(self.keys, task_id))
        return jobs.parse_status(task_id, replies, user)

    async def wait(self, task_id: str) -> Any:
        """Wait for the job's result (Swoole's `taskwait`); bound it with `asyncio.timeout()`.

        Raises:
            TaskFailed: the job failed (its error's type and message).
            ServiceUnavailable: Redis failed.
        """
        outcome = await self._outcome(task_id)
        if not outcome.ok:
            error = outcome.value if isinstance(outcome.value, dict) else {}
            raise TaskFailed(task_id, str(error.get("type", "")), str(error.get("message", "")))
        return outcome.value

    async def wait_many(
        self,
        task_ids: Iterable[str],
        timeout: float,  # noqa: ASYNC109 - what ends within a deadline, not a cancellation
    ) -> dict[str, Any | TaskFailed]:
        """The results of the jobs that end within `timeout` (Swoole's `taskWaitMulti`):
        each result, or the `TaskFailed` of a job that failed; jobs still running are
        left out."""
        ids = list(task_ids)
        waits = [asyncio.ensure_future(self.wait(task_id)) for task_id in ids]
        _, late = await asyncio.wait(waits, timeout=timeout)
        for wait in late:
            wait.cancel()
        results: dict[str, Any | TaskFailed] = {}
        for task_id, done in zip(ids, waits, strict=True):
            if done in late:
                continue
            error = done.exception()
            if error is None:
                results[task_id] = done.result()
            elif isinstance(error, TaskFailed):
                results[task_id] = error
        return results

    async def _outcome(self, task_id: str) -> jobs.Outcome:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[jobs.Outcome] = loop.create_future()
        self.waiters.setdefault(task_id, []).append(waiter)
        try:
            while True:
                status = await self.status(task_id)
                if status.outcome is not None:
                    return status.outcome
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_POLL):
                        return await asyncio.shield(waiter)
        finally:
            waiting = self.waiters.get(task_id, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self.waiters.pop(task_id, None)

    def done(self, items: list[envelope.TaskDone]) -> None:
        """Outcomes the bus brought: wake their waiters, hand them to their connections."""
        for item in items:
            outcome = jobs.Outcome(item.task_id, item.name, item.ok, jobs.unpack(item.body))
            for waiter in self.waiters.pop(item.task_id, ()):
                if not waiter.done():
                    waiter.set_result(outcome)
            for cid in item.target:
                if cid in self.dispatching:
                    self.held.setdefault(cid, []).append(outcome)
                elif self.on_outcome is not None:
                    self.on_outcome(cid, outcome)

    def _dispatched(self, conn_id: str) -> None:
        left = self.dispatching[conn_id] - 1
        if left:
            self.dispatching[conn_id] = left
            return
        del self.dispatching[conn_id]
        if conn_id in self.held:
            # After the caller's next step, which announces the dispatch.
            asyncio.get_running_loop().call_soon(self._release, conn_id)

    def _release(self, conn_id: str) -> None:
        if conn_id in self.dispatching:
            return  # another dispatch went out meanwhile: it releases them
        for outcome in self.held.pop(conn_id, ()):
            if self.on_outcome is not None:
                self.on_outcome(conn_id, outcome)

    async def close(self) -> None:
        await self.redis.close()
