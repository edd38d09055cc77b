"""Run a coroutine at once, and give it a task only if it has to wait.

Most message handlers never wait: an echo, a publish that is posted without awaiting
Redis, an error reply. Creating and scheduling an asyncio task for each of them costs
more than the handler itself. `start()` runs the coroutine right away, inside the
caller's callback, until it finishes or first suspends; only in the second case does a
task take it over, from where it stopped. This is what Python 3.12 calls an eager task
(`asyncio.eager_task_factory`); shoal supports Python 3.11, which has no such thing.

Semantics are kept for the handler: `asyncio.current_task()` during the first step
returns a stand-in that forwards `cancel()`, `uncancel()` and `cancelling()` to the task
that takes over, so `asyncio.timeout()` and `asyncio.TaskGroup` work from the first line
of a handler; context variables set in the first step are seen after it, as in a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import types

# asyncio's bookkeeping of the current task: private, but stable from 3.11 to 3.14, and
# what eager tasks themselves use.
from asyncio.tasks import _enter_task, _leave_task
from collections.abc import Coroutine, Generator
from typing import Any

Handler = Coroutine[Any, Any, None]


class _Eager:
    """What `asyncio.current_task()` returns while a coroutine runs its first step.

    Nothing can cancel it during that step (no other callback runs meanwhile); a timeout
    armed in it fires later, when the coroutine waits in the task that took over.
    """

    __slots__ = ("task",)

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None

    def cancel(self, msg: Any = None) -> bool:
        return self.task.cancel(msg) if self.task is not None else False

    def cancelling(self) -> int:
        return self.task.cancelling() if self.task is not None else 0

    def uncancel(self) -> int:
        return self.task.uncancel() if self.task is not None else 0

    def get_name(self) -> str:
        return self.task.get_name() if self.task is not None else "eager"

    def done(self) -> bool:
        return self.task.done() if self.task is not None else False


def start(coro: Handler, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None] | None:
    """Run `coro` until it finishes or first suspends.

    Returns:
        None if it finished; otherwise the task that runs the rest of it.

    Raises:
        Whatever `coro` raised in its first step (it is then finished).
    """
    context = contextvars.copy_context()
    stand_in = _Eager()
    # Called from a callback there is no current task; from a task, it steps aside.
    previous = asyncio.current_task(loop)
    if previous is not None:
        _leave_task(loop, previous)
    # Typed as a Task by typeshed; asyncio keeps whatever it is given.
    _enter_task(loop, stand_in)  # type: ignore[arg-type]
    try:
        awaited = context.run(coro.send, None)
    except StopIteration:
        return None
    finally:
        _leave_task(loop, stand_in)  # type: ignore[arg-type]
        if previous is not None:
            _enter_task(loop, previous)
    task = loop.create_task(_resume(coro, awaited), context=context)
    stand_in.task = task
    return task


async def _resume(coro: Handler, awaited: Any) -> None:
    """Drive `coro` on, in this task, from where it suspended on `awaited`.

    A coroutine suspends by yielding the future it waits for (or None, to yield to the
    loop once). Once that future is done, `send(None)` makes the coroutine read the
    future's outcome itself, exactly as in a task. Cancelling this task cancels the
    future the coroutine waits for, which raises CancelledError in it, as in a task.
    """
    while True:
        if awaited is None:
            await asyncio.sleep(0)
        else:
            # Whatever the outcome, the coroutine reads it itself when sent None.
            with contextlib.suppress(BaseException):
                await _wait(awaited)
        try:
            awaited = coro.send(None)
        except StopIteration:
            return


@types.coroutine
def _wait(future: asyncio.Future[Any]) -> Generator[Any, None, None]:
    """Wait for `future` without taking its result: yield it to the task driving us."""
    if not future.done():
        future._asyncio_future_blocking = True
        yield future
