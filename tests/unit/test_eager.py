"""Handlers run at once and get a task only if they wait, with a task's semantics."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from shoal.workers import eager

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


async def test_a_coroutine_that_never_waits_runs_at_once_without_a_task() -> None:
    done: list[str] = []

    async def handler() -> None:
        assert asyncio.current_task() is not None  # code may ask for it, as in a task
        done.append("ran")

    tasks_before = len(asyncio.all_tasks())
    assert eager.start(handler(), asyncio.get_running_loop()) is None
    assert done == ["ran"]  # before start() returned: no loop turn
    assert len(asyncio.all_tasks()) == tasks_before


async def test_one_that_waits_goes_on_in_a_task_from_where_it_stopped() -> None:
    steps: list[str] = []
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        steps.append("first")
        steps.append(f"got {await gate}")

    task = eager.start(handler(), asyncio.get_running_loop())
    assert task is not None and steps == ["first"]
    gate.set_result(7)
    await task
    assert steps == ["first", "got 7"]


async def test_a_timeout_armed_before_the_first_wait_fires_in_the_task() -> None:
    outcome: list[str] = []

    async def handler() -> None:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(10)
        except TimeoutError:
            outcome.append("timed out")

    task = eager.start(handler(), asyncio.get_running_loop())
    assert task is not None
    await asyncio.wait_for(task, 5)
    assert outcome == ["timed out"]


async def test_a_timeout_that_does_not_fire_costs_nothing() -> None:
    async def handler() -> None:
        async with asyncio.timeout(10):  # noqa: ASYNC100 - armed and disarmed, never waited
            pass

    assert eager.start(handler(), asyncio.get_running_loop()) is None


async def test_a_task_group_in_a_handler() -> None:
    results: list[int] = []

    async def child(n: int) -> None:
        await asyncio.sleep(0)
        results.append(n)

    async def handler() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(child(1))
            group.create_task(child(2))

    task = eager.start(handler(), asyncio.get_running_loop())
    assert task is not None
    await task
    assert sorted(results) == [1, 2]


async def test_context_variables_set_before_the_first_wait_are_seen_after_it() -> None:
    seen: list[str] = []

    async def handler() -> None:
        VAR.set("mine")
        await asyncio.sleep(0)
        seen.append(VAR.get())

    task = eager.start(handler(), asyncio.get_running_loop())
    assert task is not None
    await task
    assert seen == ["mine"]
    assert VAR.get() == "unset"  # and the caller's context is untouched


async def test_errors_surface_where_the_coroutine_is() -> None:
    async def fails_at_once() -> None:
        raise ValueError("first step")

    with pytest.raises(ValueError, match="first step"):
        eager.start(fails_at_once(), asyncio.get_running_loop())

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    task = eager.start(fails_later(), asyncio.get_running_loop())
    assert task is not None
    with pytest.raises(KeyError):
        await task


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    cleaned: list[str] = []

    async def handler() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cleaned.append("cancelled where it waited")
            raise

    task = eager.start(handler(), asyncio.get_running_loop())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["cancelled where it waited"]


async def test_a_bare_yield_to_the_loop() -> None:
    steps: list[int] = []

    async def handler() -> None:
        steps.append(1)
        await asyncio.sleep(0)  # yields None, not a future
        steps.append(2)
        await asyncio.sleep(0)
        steps.append(3)

    task = eager.start(handler(), asyncio.get_running_loop())
    assert task is not None and steps == [1]
    await task
    assert steps == [1, 2, 3]
