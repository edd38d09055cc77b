"""The task pool's side of the queue: take jobs from the Redis stream, run them in the
pool, record and deliver each outcome once (see `shoal.core.jobs` for the guarantees).

Three loops share one consumer name in the group (a fourth, `tidy`, removes the names
of pools that died): `take` reads new jobs (a blocking
XREADGROUP on a connection of its own, as arq does) while the pool has room; `reclaim`
takes over jobs whose consumer stopped renewing them for `tasks.visibility_timeout` (a
pool process that died); `renew` renews the jobs running here, so that no other pool
takes over a long job that is alive. A fifth, `measure`, reads the queue's depth for
the node's metrics (`shoal.core.metrics`), which count each job's outcome and runs too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

from shoal.config.model import Config
from shoal.core import envelope, jobs
from shoal.core import task as task_api
from shoal.core.backoff import full_jitter
from shoal.core.errors import RedisReplyError, ServiceUnavailable
from shoal.core.keys import Keys
from shoal.core.metrics import counters
from shoal.core.resp import Client, RedisAddress, Timeouts
from shoal.tasks.pool import ChildDied, Pool, TaskTimeout

logger = logging.getLogger(__name__)

_BLOCK_MS = 1000
_AFTER_DEATH = 0.2
_MEASURE_EVERY = 2.0


class Consumer:
    """One task pool's consumer of the queue.

    Args:
        config: the node's configuration.
        redis_url: the Redis shared with the WebSocket workers.
        name: this consumer's name in the group, unique in the deployment.
        pool: where jobs run.
        tasks: the registered tasks (for their timeouts).
    """

    def __init__(
        self,
        config: Config,
        redis_url: str,
        name: str,
        pool: Pool,
        tasks: dict[str, task_api.Registered],
    ) -> None:
        self.config = config.tasks
        self.keys = Keys(config.redis.prefix)
        address = RedisAddress.from_url(redis_url)
        timeouts = Timeouts.from_config(config.redis)
        self.redis = Client(address, timeouts, encoding=None)
        # The blocking read may wait `_BLOCK_MS` for a reply: its connection must not
        # count that as a stall.
        block = _BLOCK_MS / 1000
        self.reader = Client(
            address,
            Timeouts(
                connect=timeouts.connect,
                stall=timeouts.stall + block,
                socket=timeouts.socket + block,
                health_check=timeouts.health_check,
            ),
            encoding=None,
        )
        self.name = name
        self.pool = pool
        self.tasks = tasks
        self.running: dict[str, asyncio.Task[None]] = {}
        self.room = asyncio.Event()
        self.room.set()
        self.taking = True

    # The loops

    async def take(self) -> None:
        """Read new jobs while the pool has room, until `stop_taking()`."""
        failures = 0
        grouped = False
        while self.taking:
            if not grouped:
                grouped = await self._create_group()
                if not grouped:  # no job was ever dispatched (or Redis restarted empty)
                    await asyncio.sleep(_BLOCK_MS / 1000)
                    continue
            free = self.pool.capacity - len(self.running)
            if free <= 0:
                self.room.clear()
                await self.room.wait()
                continue
            try:
                reply = await self.reader.execute(*jobs.read(self.keys, self.name, free, _BLOCK_MS))
            except RedisReplyError as exc:
                if str(exc).startswith("NOGROUP"):  # Redis restarted empty
                    grouped = False
                    continue
                failures = await self._pause("reading jobs", exc, failures)
                continue
            except ServiceUnavailable as exc:
                failures = await self._pause("reading jobs", exc, failures)
                continue
            failures = 0
            for job in jobs.parse_read(reply):
                self._start(job)

    async def reclaim(self) -> None:
        """Take over jobs whose consumer stopped renewing them."""
        idle_ms = int(self.config.visibility_timeout * 1000)
        while True:
            await asyncio.sleep(min(5.0, self.config.visibility_timeout / 4))
            free = self.pool.capacity - len(self.running)
            if not self.taking or free <= 0:
                continue
            try:
                reply = await self.redis.execute(*jobs.reclaim(self.keys, self.name, idle_ms, free))
            except ServiceUnavailable as exc:
                logger.debug("reclaiming jobs failed: %s", exc)
                continue
            for job in jobs.parse_reclaim(reply):
                if job.id not in self.running:
                    logger.info(
                        "took over task %s (%s): its consumer went silent", job.id, job.name
                    )
                    self._start(job)

    async def tidy(self) -> None:
        """Remove from the group what is left of pools that died (killed, or lost with
        their machine) once nobody holds their jobs: otherwise each crash leaves one more
        consumer in the group, forever."""
        period = self.config.visibility_timeout
        while True:
            await asyncio.sleep(period)
            try:
                reply = await self.redis.execute(*jobs.consumers(self.keys))
                gone = jobs.parse_gone(reply, int(2 * period * 1000), self.name)
                if gone:
                    await self.redis.pipeline([jobs.leave(self.keys, name) for name in gone])
                    logger.info("removed %d consumers of task pools that died", len(gone))
            except ServiceUnavailable as exc:  # no queue yet, or Redis away: next time
                logger.debug("tidying the task group failed: %s", exc)

    async def renew(self) -> None:
        """Keep the jobs running here from being taken over."""
        while True:
            await asyncio.sleep(self.config.visibility_timeout / 3)
            if self.running:
                with contextlib.suppress(ServiceUnavailable):
                    await self.redis.execute(*jobs.renew(self.keys, self.name, list(self.running)))

    async def measure(self) -> None:
        """Keep the queue's depth in the metrics: jobs queued or running, deployment-wide."""
        while True:
            try:
                counters.task_queue_depth = await self.redis.execute(*jobs.depth(self.keys))
            except ServiceUnavailable as exc:  # the last depth read stays
                logger.debug("reading the task queue's depth failed: %s", exc)
            await asyncio.sleep(_MEASURE_EVERY)

    # Stopping

    def stop_taking(self) -> None:
        self.taking = False
        self.room.set()

    async def drain(self, grace: float) -> None:
        """Let running jobs finish within `grace` seconds; hand the others back to the
        queue (any pool may take them at once), leave the group if nothing is left in
        this consumer's name, then close."""
        unfinished: set[asyncio.Task[None]] = set()
        if self.running:
            _, unfinished = await asyncio.wait(list(self.running.values()), timeout=grace)
        with contextlib.suppress(ServiceUnavailable):
            if unfinished:
                ids = [tid for tid, job in self.running.items() if job in unfinished]
                logger.warning("handing %d unfinished tasks back to the queue", len(ids))
                for job in unfinished:
                    job.cancel()
                idle_ms = int(self.config.visibility_timeout * 1000) + 1
                await self.redis.execute(*jobs.hand_back(self.keys, self.name, ids, idle_ms))
            else:
                await self.redis.execute(*jobs.leave(self.keys, self.name))
        await self.redis.close()
        await self.reader.close()

    # One job

    def _start(self, job: jobs.Job) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(job), name=f"task {job.id}")
        self.running[job.id] = task
        task.add_done_callback(lambda _: self._ended(job.id))

    def _ended(self, task_id: str) -> None:
        self.running.pop(task_id, None)
        self.room.set()

    async def _handle(self, job: jobs.Job) -> None:
        try:
            outcome = await self._run(job)
            if outcome is not None:
                await self._finish(job, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Redis failed past the retries: the job stays pending, and is taken over
            # after the visibility timeout.
            logger.exception("task %s (%s) could not be completed", job.id, job.name)

    async def _run(self, job: jobs.Job) -> jobs.Outcome | None:
        """Run `job` until it succeeds, fails for good or is abandoned; None if an
        outcome was recorded by an earlier run (the entry is then forgotten here)."""
        config = self.config
        registered = self.tasks.get(job.name)
        timeout = registered.timeout if registered and registered.timeout else config.timeout
        while True:
            state, attempt, _ = await self._retrying(
                [
                    ("HGET", self.keys.task(job.id), "state"),
                    *jobs.start(self.keys, job.id, config.result_ttl + timeout),
                ]
            )
            if state is not None:
                await self._retrying(jobs.forget(self.keys, [job.id]))
                return None
            if attempt > config.max_retries + 1:
                counters.tasks["abandoned"] += 1
                return self._failed(
                    job, "TaskAbandoned", f"its task process died {attempt - 1} times running it"
                )
            started = time.monotonic()
            try:
                ran = await self.pool.run(job, attempt, timeout)
            except TaskTimeout as exc:
                counters.ran(time.monotonic() - started)
                counters.tasks["timeout"] += 1
                return self._failed(job, "TaskTimeout", str(exc))
            except ChildDied as exc:
                logger.error("%s (attempt %d)", exc, attempt)
                # A pause before the next run: when several task processes die at once
                # (an OOM kill, an operator's kill), the pool sees them all go before it
                # picks one for this job.
                await asyncio.sleep(random.uniform(_AFTER_DEATH / 2, _AFTER_DEATH))
                continue
            counters.ran(time.monotonic() - started)
            if ran.ok or not ran.retryable or attempt > config.max_retries:
                counters.tasks["ok" if ran.ok else "failed"] += 1
                return jobs.Outcome(job.id, job.name, ran.ok, jobs.unpack(ran.body))
            delay = config.retry_backoff * 2 ** (attempt - 1)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    @staticmethod
    def _failed(job: jobs.Job, type_: str, message: str) -> jobs.Outcome:
        return jobs.Outcome(job.id, job.name, False, jobs.error(type_, message))

    async def _finish(self, job: jobs.Job, outcome: jobs.Outcome) -> None:
        """Record the outcome; if this run recorded it, deliver it; forget the job."""
        keys = self.keys
        recorded, worker = await self._retrying(
            [
                jobs.finish(keys, job, outcome, self.config.result_ttl),
                ("HGET", keys.conn(job.conn), "worker"),
            ]
        )
        commands: list[tuple[Any, ...]] = []
        if recorded:
            if worker is not None:
                recipients = {_text(worker): [job.conn]}
            else:  # the connection closed: its user's other connections, if any
                [connections] = await self._retrying([("HGETALL", keys.user(job.user))])
                recipients = _by_worker(connections)
            body = jobs.pack(outcome.value)
            for wid, cids in recipients.items():
                commands.append(
                    (
                        "PUBLISH",
                        keys.bus_worker(wid),
                        envelope.task_done(job.id, job.name, outcome.ok, body, cids),
                    )
                )
        await self._retrying([*commands, *jobs.forget(keys, [job.id])])

    async def _retrying(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run `commands` in one pipeline, retrying with backoff while Redis cannot be
        reached or is busy.

        Raises:
            RedisReplyError: Redis refused a command for good (it is not retried).
        """
        failures = 0
        while True:
            try:
                return await self.redis.pipeline(commands)
            except RedisReplyError as exc:
                if not exc.transient:
                    raise
                failures = await self._pause("a task's bookkeeping", exc, failures)
            except ServiceUnavailable as exc:
                failures = await self._pause("a task's bookkeeping", exc, failures)

    async def _create_group(self) -> bool:
        """Make sure the consumer group exists; False while there is no stream yet."""
        failures = 0
        while True:
            try:
                await self.redis.execute(*jobs.create_group(self.keys))
                return True
            except RedisReplyError as exc:
                if str(exc).startswith("BUSYGROUP"):
                    return True
                if "requires the key to exist" in str(exc):
                    return False
                failures = await self._pause("creating the task group", exc, failures)
            except ServiceUnavailable as exc:
                failures = await self._pause("creating the task group", exc, failures)

    @staticmethod
    async def _pause(what: str, exc: Exception, failures: int) -> int:
        if failures == 0:
            logger.warning("redis failed while %s (%s); retrying", what, exc)
        await asyncio.sleep(full_jitter(failures, 0.05, 2.0))
        return failures + 1


def _by_worker(connections: Any) -> dict[str, list[str]]:
    """A user's connections (a flat `connection id, worker id` reply), by worker."""
    grouped: dict[str, list[str]] = {}
    flat = connections or []
    for i in range(0, len(flat) - 1, 2):
        grouped.setdefault(_text(flat[i + 1]), []).append(_text(flat[i]))
    return grouped


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
