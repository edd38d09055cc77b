"""The task processes of one pool: `python -m shoal.tasks.child` children, each running up
to `tasks.concurrency` jobs, fed and answered as msgpack over their standard input and
output, with no polling anywhere.

Why not aiomultiprocess, which the design first named: its pool polls. Each child wakes
every 5 ms to look for work, the parent every 5 ms for results and child deaths, and each
`apply()` every 5 ms for its answer. Measured on the 2-core machine of
docs/performance.md, a pool of two idle children cost 11 % of a core, and a no-op job
13 ms from `apply()` to its result, which bounds two children of 16 jobs each to about
2,500 jobs a second. A child killed mid-job also leaves that job's `apply()` waiting
forever. Here every child has pipes of its own: the pool knows which jobs run where, it waits on
each child, whose death fails the jobs it ran with `ChildDied` at once, and an idle pool
sleeps.

A job that runs past its timeout fails with `TaskTimeout`; when it is alone on its child,
that child is killed (a sync function cannot be interrupted otherwise) and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shoal.config.model import Config
from shoal.core.backoff import full_jitter
from shoal.core.jobs import Job
from shoal.tasks.child import DONE, INIT, JOB

logger = logging.getLogger(__name__)

# A child that dies within this long of its start counts as failing to start: its
# replacement waits, with a growing delay, instead of looping at full speed.
_STABLE_AFTER = 5.0
_STOP_GRACE = 2.0


class ChildDied(Exception):
    """The task process running the job died (killed, or crashed in C)."""


class TaskTimeout(Exception):
    """The job ran past its timeout."""


@dataclass(frozen=True, slots=True)
class Ran:
    """What a job's run produced: its outcome as msgpack, and whether a failure may be
    retried (its exception is in the task's `retry_on`)."""

    ok: bool
    body: bytes
    retryable: bool


@dataclass(eq=False)
class _Child(asyncio.Protocol):
    """One task process, from the pool's side: its pipes and its running jobs."""

    pool: Pool
    process: asyncio.subprocess.Process | None = None
    killed: bool = False  # by the pool: it takes no more jobs, and is being replaced
    failures: int = 0  # deaths in a row, each soon after its start
    running: dict[str, asyncio.Future[Ran]] = field(default_factory=dict)
    unpacker: msgpack.Unpacker = field(default_factory=msgpack.Unpacker)

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        for message in self.unpacker:
            if message[0] == DONE:
                _, task_id, ok, body, retryable = message
                waiter = self.running.pop(task_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(Ran(ok, body, retryable))

    def send(self, message: tuple[Any, ...]) -> None:
        process = self.process
        if process is not None and process.stdin is not None:
            process.stdin.write(msgpack.packb(message))


class Pool:
    """`processes` task processes running up to `tasks.concurrency` jobs each.

    Args:
        config: the node's configuration (`tasks.*`, `log.*`, `redis.prefix`).
        redis_url: where the task contexts' emitters publish.
        processes: how many task processes.
    """

    def __init__(self, config: Config, redis_url: str, processes: int) -> None:
        self.config = config
        self.processes = processes
        self.concurrency = config.tasks.concurrency
        self.settings = {
            "modules": list(config.tasks.modules),
            "redis_url": redis_url,
            "prefix": config.redis.prefix,
            "nice": config.tasks.nice,
            "sched_idle": config.tasks.sched_idle,
            "log_level": config.log.level,
            "log_format": config.log.format,
            "sys_path": list(sys.path),
            # Through the child's input, not its command line or environment.
            "config": {
                **config.tasks.model_dump(mode="json"),
                "smtp": {
                    **config.tasks.smtp.model_dump(mode="json"),
                    "password": config.tasks.smtp.secret(),
                },
            },
        }
        self.children: list[_Child] = []
        self.keepers: set[asyncio.Task[None]] = set()
        self.closing = False
        self.ready = asyncio.Event()  # set while some task process takes jobs

    @property
    def capacity(self) -> int:
        """How many jobs the pool runs at once."""
        return self.processes * self.concurrency

    async def start(self) -> None:
        """Start every task process."""
        for _ in range(self.processes):
            child = _Child(self)
            await self._spawn(child)
            self.children.append(child)

    async def run(
        self,
        job: Job,
        attempt: int,
        timeout: float,  # noqa: ASYNC109 - past it, the job's process may be killed
    ) -> Ran:
        """Run `job` in the task process with the fewest jobs.

        Raises:
            ChildDied: the process running it died (or none could be started).
            TaskTimeout: it ran longer than `timeout` seconds.
        """
        child = await self._pick()
        waiter: asyncio.Future[Ran] = asyncio.get_running_loop().create_future()
        child.running[job.id] = waiter
        child.send((JOB, job.id, job.name, job.data, job.user, job.conn, attempt))
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            self._abandon(child, job.id)
            raise TaskTimeout(f"ran longer than {timeout:g} s") from None
        finally:
            child.running.pop(job.id, None)

    async def _pick(self) -> _Child:
        """The live task process with the fewest jobs; waits while none is live."""
        while True:
            live = [c for c in self.children if c.process is not None and not c.killed]
            if live:
                return min(live, key=lambda c: len(c.running))
            self.ready.clear()
            await self.ready.wait()

    def _abandon(self, child: _Child, task_id: str) -> None:
        process = child.process
        alone = set(child.running) <= {task_id}
        if process is not None and alone:
            logger.warning(
                "task %s ran past its timeout: killing task process %d", task_id, process.pid
            )
            child.killed = True
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        else:
            logger.warning("task %s ran past its timeout: abandoned", task_id)

    async def _spawn(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        # Results come back on a pipe read by the child's protocol, not a StreamReader.
        results, their_end = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "shoal.tasks.child",
                stdin=asyncio.subprocess.PIPE,
                stdout=their_end,
                stderr=None,  # the log, like this process's
            )
        except BaseException:
            os.close(results)
            raise
        finally:
            os.close(their_end)
        child.process = process
        child.killed = False
        self.ready.set()
        transport, _ = await loop.connect_read_pipe(
            lambda: child, os.fdopen(results, "rb", buffering=0)
        )
        child.send((INIT, self.settings))
        keeper = loop.create_task(self._keep(child, process, transport), name="task-process")
        self.keepers.add(keeper)
        keeper.add_done_callback(self.keepers.discard)

    async def _keep(
        self, child: _Child, process: asyncio.subprocess.Process, transport: asyncio.BaseTransport
    ) -> None:
        """When the process exits: fail its jobs at once, and start another."""
        started = asyncio.get_running_loop().time()
        while True:
            code = await process.wait()
            child.killed = True  # until its replacement runs
            transport.close()
            error = ChildDied(f"task process {process.pid} died ({_how(code)})")
            for waiter in child.running.values():
                if not waiter.done():
                    waiter.set_exception(error)
            child.running.clear()
            if self.closing:
                return
            logger.error("%s; starting another", error)
            ran = asyncio.get_running_loop().time() - started
            child.failures = 0 if ran >= _STABLE_AFTER else child.failures + 1
            if child.failures > 1:
                await asyncio.sleep(full_jitter(child.failures - 1, 0.5, 30.0))
            try:
                await self._spawn(child)
            except OSError:
                logger.exception("cannot start a task process")
                continue
            return

    async def close(self) -> None:
        """Stop the task processes: each sees its input end and exits; those still
        there after a grace period are killed."""
        self.closing = True
        for child in self.children:
            if child.process is not None and child.process.stdin is not None:
                child.process.stdin.close()
        waits = [c.process.wait() for c in self.children if c.process is not None]
        if waits:
            _, late = await asyncio.wait(
                [asyncio.ensure_future(w) for w in waits], timeout=_STOP_GRACE
            )
            for child in self.children:
                if child.process is not None and child.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
            if late:
                await asyncio.wait(late)


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
