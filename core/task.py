"""The task API: what users write to run slow jobs in the task pool (Swoole's `onTask`).

A task is a function registered under a name in a module listed in `tasks.modules`::

    from shoal.core.task import TaskContext, task

    @task("resize_image", timeout=120, retry_on=(OSError,))
    def resize_image(ctx: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        ...  # CPU-heavy: runs in a task process, in a thread off its event loop
        return {"url": url}

    @task("notify")
    async def notify(ctx: TaskContext, data: dict[str, Any]) -> None:
        await ctx.emitter.to_user(ctx.user_id).send({"type": "done"})

A WebSocket handler dispatches it with `await conn.dispatch("resize_image", data)` and
the result comes back to that client asynchronously. `data` and the return value travel
as msgpack: dicts, lists, strings, bytes, numbers, booleans and None.

A task that raises fails with `{"type": <exception class name>, "message": str(exc)}`;
exceptions listed in `retry_on` are retried first, up to `tasks.max_retries` times with
exponential backoff. Both sides import the task modules: the WebSocket workers to know
the names (an unknown one is refused at once), the task processes to run them. This
module carries no process role, so that importing a task module loads neither.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shoal.core.errors import BootError

if TYPE_CHECKING:
    from shoal.core.emitter import AsyncEmitter

__all__ = ["Registered", "TaskContext", "load", "registry", "task"]

TaskFunction = Callable[["TaskContext", Any], Any] | Callable[["TaskContext", Any], Awaitable[Any]]


@dataclass(slots=True)
class TaskContext:
    """What a task function gets besides its data.

    Attributes:
        task_id: the job's id, unique in the deployment.
        name: the task's name.
        user_id: the user whose connection dispatched it.
        conn_id: that connection's id (it may have closed since).
        attempt: 1 for the first run, then 2, 3... (retries and runs after a crash).
        emitter: reaches clients through the workers' Redis bus (rooms, users,
            everyone), as `shoal.core.emitter.AsyncEmitter` does from any process.
        config: the node's `tasks` configuration section, as a dict (`smtp` included).
    """

    task_id: str
    name: str
    user_id: str
    conn_id: str
    attempt: int
    emitter: AsyncEmitter
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Registered:
    """One registered task."""

    name: str
    function: TaskFunction
    timeout: float | None = None
    retry_on: tuple[type[BaseException], ...] = field(default=())


_REGISTRY: dict[str, Registered] = {}


def task(
    name: str,
    *,
    timeout: float | None = None,
    retry_on: Iterable[type[BaseException]] = (),
) -> Callable[[TaskFunction], TaskFunction]:
    """Register the decorated function as the task `name`.

    Args:
        name: what `dispatch()` names; 1-64 letters, digits, `_`, `.` or `-`.
        timeout: seconds a run may take (default `tasks.timeout`).
        retry_on: exception classes that make a failure worth retrying.

    Raises:
        ValueError: the name is invalid or already taken by another function.
    """
    if not name or len(name) > 64 or not all(c.isalnum() or c in "_.-" for c in name):
        raise ValueError(f"invalid task name {name!r}: 1-64 letters, digits, '_', '.' or '-'")

    def register(function: TaskFunction) -> TaskFunction:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.function is not function:
            raise ValueError(f"task {name!r} is registered twice")
        _REGISTRY[name] = Registered(name, function, timeout, tuple(retry_on))
        return function

    return register


def registry() -> dict[str, Registered]:
    """Every task registered so far, by name."""
    return dict(_REGISTRY)


def load(modules: Iterable[str]) -> dict[str, Registered]:
    """Import the task modules (`tasks.modules`); return every registered task.

    Raises:
        BootError: a module cannot be imported (named, with the reason).
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise BootError(f"tasks.modules: cannot import {module!r}: {exc}") from exc
    return registry()
