"""One task process: `python -m shoal.tasks.child`, started by its pool (`shoal.tasks.pool`).

It speaks msgpack on the standard input and output it was started with (moved to other
descriptors, so that a task's print() reaches the log), one object after another:

- in: `[INIT, settings]` once, then `[JOB, task_id, name, data, user, conn, attempt]`;
- out: `[DONE, task_id, ok, body, retryable]` for each job, in the order they end, where
  `body` is msgpack of the result, or of the error `{"type": ..., "message": ...}`.

An async task runs on this process's event loop; a sync one in a thread, so that the
other jobs go on meanwhile. The end of its input (the pool closed it, or the pool
process died) ends the process at once: nothing outlives its pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
from typing import Any

import msgpack
import uvloop

from shoal.core import jobs, logs
from shoal.core import task as task_api
from shoal.core.emitter import AsyncEmitter

logger = logging.getLogger(__name__)

INIT, JOB, DONE = 0, 1, 2


class _Child(asyncio.Protocol):
    """Reads jobs from standard input; writes outcomes to standard output."""

    def __init__(self, out: asyncio.WriteTransport, gone: asyncio.Future[None]) -> None:
        self.out = out
        self.gone = gone
        self.unpacker = msgpack.Unpacker()
        self.tasks: dict[str, task_api.Registered] = {}
        self.emitter: AsyncEmitter | None = None
        self.config: dict[str, Any] = {}
        self.running: set[asyncio.Task[None]] = set()

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        for message in self.unpacker:
            if message[0] == JOB:
                task = asyncio.get_running_loop().create_task(self._run(*message[1:]))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
            elif message[0] == INIT:
                self._init(message[1])

    def eof_received(self) -> bool | None:
        if not self.gone.done():
            self.gone.set_result(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof_received()

    def _init(self, settings: dict[str, Any]) -> None:
        logs.setup(settings["log_level"], settings["log_format"])
        logs.set_role("task process")
        sys.path[:] = settings["sys_path"]
        if settings["sched_idle"] and hasattr(os, "SCHED_IDLE"):
            # Linux: a WebSocket worker that wakes preempts this process at once, where
            # a nice value only lowers its share of the CPU.
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        if settings["nice"]:
            os.nice(settings["nice"])
        self.tasks = task_api.load(settings["modules"])
        self.emitter = AsyncEmitter(settings["redis_url"], settings["prefix"])
        self.config = settings["config"]

    async def _run(  # noqa: PLR0917 - the fields of one JOB message, in order
        self, task_id: str, name: str, data: bytes, user: str, conn: str, attempt: int
    ) -> None:
        ok, body, retryable = await self._outcome(task_id, name, data, user, conn, attempt)
        self.out.write(msgpack.packb((DONE, task_id, ok, body, retryable)))

    async def _outcome(  # noqa: PLR0917 - as `_run`
        self, task_id: str, name: str, data: bytes, user: str, conn: str, attempt: int
    ) -> tuple[bool, bytes, bool]:
        registered = self.tasks.get(name)
        if registered is None or self.emitter is None:
            return False, jobs.pack(jobs.error("UnknownTask", f"Unknown task: {name}")), False
        context = task_api.TaskContext(
            task_id, name, user, conn, attempt, self.emitter, self.config
        )
        try:
            value = await _call(registered, context, jobs.unpack(data))
            return True, jobs.pack(value), False
        except Exception as exc:
            retryable = isinstance(exc, registered.retry_on)
            logger.warning(
                "task %s (%s) failed on attempt %d%s",
                name,
                task_id,
                attempt,
                ", will retry" if retryable else "",
                exc_info=not retryable,
            )
            return False, jobs.pack(jobs.error(type(exc).__name__, str(exc))), retryable


async def _call(registered: task_api.Registered, context: task_api.TaskContext, data: Any) -> Any:
    function = registered.function
    if inspect.iscoroutinefunction(function):
        return await function(context, data)
    return await asyncio.to_thread(function, context, data)


async def serve() -> None:
    # The pipes to the pool move to fds of their own: a print() in a task goes to the
    # log (standard output becomes standard error), never into the channel.
    channel_in, channel_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    out, _ = await loop.connect_write_pipe(
        asyncio.Protocol, os.fdopen(channel_out, "wb", buffering=0)
    )
    _, child = await loop.connect_read_pipe(
        lambda: _Child(out, gone), os.fdopen(channel_in, "rb", buffering=0)
    )
    await gone
    # The pool closed our input (it stops) or died: whatever still runs is abandoned.
    for task in child.running:
        task.cancel()
    if child.emitter is not None:
        with contextlib.suppress(Exception):
            await child.emitter.close()


def main() -> None:
    # The master and the pool decide about Ctrl-C and SIGTERM for the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(serve())
    sys.stderr.flush()
    os._exit(0)  # threads still running a sync task must not hold the process


if __name__ == "__main__":
    main()
