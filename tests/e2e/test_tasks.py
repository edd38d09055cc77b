"""Task workers end to end: real `shoal serve` and `shoal tasks` processes, a real Redis,
a plain `websockets` client speaking the chat protocol, and `kill -9` mid-job."""

from __future__ import annotations

import asyncio
import email
import os
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiosmtpd.controller import Controller

from support import (
    FAST_REDIS,
    SCALE,
    SHOAL,
    Client,
    RedisServer,
    Shoal,
    client,
    clients_on_workers,
    eventually,
    free_port,
    wait_until,
)

# Test tasks: `slow` sleeps, then says which attempt finished it; `flaky` fails with a
# retryable error until its third attempt.
TASKS = textwrap.dedent(
    """
    import asyncio
    import time
    from typing import Any

    from shoal.core.task import TaskContext, task


    class Flaky(Exception):
        pass


    @task("slow")
    async def slow(ctx: TaskContext, data: Any) -> dict[str, Any]:
        await asyncio.sleep(data["seconds"])
        return {"attempt": ctx.attempt, "user": ctx.user_id}


    @task("first_run_hangs")
    async def first_run_hangs(ctx: TaskContext, data: Any) -> int:
        if ctx.attempt == 1:
            await asyncio.sleep(600)
        return ctx.attempt


    @task("spin", timeout=1)
    def spin(ctx: TaskContext, data: Any) -> None:
        time.sleep(30)


    @task("flaky", retry_on=(Flaky,))
    def flaky(ctx: TaskContext, data: Any) -> int:
        if ctx.attempt < 3:
            raise Flaky(f"attempt {ctx.attempt}")
        return ctx.attempt
    """
)


@pytest.fixture
def task_module(tmp_path: Path) -> Path:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "testtasks.py").write_text(TASKS)
    return folder


def tasks_settings(settings: dict[str, Any], **tasks: Any) -> dict[str, Any]:
    return {
        **settings,
        "tasks": {
            "task_worker_num": 2,
            "modules": ["shoal.tasks.builtin", "testtasks"],
            "visibility_timeout": 2,
            "retry_backoff": 0.05,
            **tasks,
        },
    }


@pytest.fixture
def node(tmp_path: Path, settings: dict[str, Any], task_module: Path) -> Iterator[Shoal]:
    shoal = Shoal(tmp_path, tasks_settings(settings)).start(app_path=task_module)
    yield shoal
    shoal.stop()


def task_processes() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "^shoal: task process"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def task_pool_pid(node: Shoal) -> int:
    (pid,) = [p for p in node.child_pids() if _title(p).startswith("shoal: task pool")]
    return pid


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def dispatch(c: Client, task: str, data: Any) -> str:
    reply = await c.request({"type": "task", "task": task, "data": data}, "task_dispatched")
    assert reply["task"] == task
    return str(reply["task_id"])


def test_task_processes_run_below_the_websocket_workers(node: Shoal) -> None:
    """tasks.nice and, on Linux, SCHED_IDLE: a waking worker preempts a busy task process."""
    pids = wait_until(lambda: len(task_processes()) == 2 and task_processes(), 20, "2 processes")
    for pid in pids:
        wait_until(lambda p=pid: os.getpriority(os.PRIO_PROCESS, p) == 10, 10, "nice 10")
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    for pid in node.worker_pids():
        assert os.getpriority(os.PRIO_PROCESS, pid) == 0
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER


async def test_a_task_result_comes_back_to_the_client_that_dispatched_it(node: Shoal) -> None:
    async with client(node.url("ann")) as ann:
        task_id = await dispatch(ann, "process_data", {"numbers": [1, 2, 3, 4]})
        result = await ann.expect("task_result", timeout=20)
        assert result == {
            "type": "task_result",
            "task_id": task_id,
            "task": "process_data",
            "result": {"count": 4, "sum": 10, "mean": 2.5, "median": 2.5,
                       "stdev": pytest.approx(1.118, abs=1e-3), "min": 1, "max": 4},
        }  # fmt: skip
        # The outcome stays readable for tasks.result_ttl, by its user alone.
        again = await ann.request({"type": "task_status", "task_id": task_id}, "task_result")
        assert again == result
        async with client(node.url("bo")) as bo:
            other = await bo.request({"type": "task_status", "task_id": task_id}, "task_status")
            assert other == {"type": "task_status", "task_id": task_id, "state": "unknown"}


async def test_a_failing_task_answers_a_typed_error_and_no_traceback(node: Shoal) -> None:
    async with client(node.url("ann")) as ann:
        task_id = await dispatch(ann, "process_data", {"numbers": "nope"})
        failed = await ann.expect("task_failed", timeout=20)
        assert failed == {
            "type": "task_failed",
            "task_id": task_id,
            "task": "process_data",
            "error": {"type": "ValueError",
                      "message": "data.numbers must be a non-empty list of numbers"},
        }  # fmt: skip


async def test_unknown_tasks_and_bad_data_are_refused_at_once(node: Shoal) -> None:
    async with client(node.url("ann")) as ann:
        await ann.send({"type": "task", "task": "nope", "data": {}})
        assert await ann.expect("error") == {"type": "error", "message": "Unknown task: nope"}
        await ann.send({"type": "task", "data": {}})
        assert await ann.expect("error") == {"type": "error", "message": "Missing task"}
        reply = await ann.request({"type": "task_status", "task_id": "1-0"}, "task_status")
        assert reply == {"type": "task_status", "task_id": "1-0", "state": "unknown"}
        await ann.send({"type": "task_status", "task_id": "../x"})
        assert await ann.expect("error") == {"type": "error", "message": "Invalid task_id"}


async def test_a_retryable_failure_is_retried_until_it_succeeds(node: Shoal) -> None:
    async with client(node.url("ann")) as ann:
        task_id = await dispatch(ann, "flaky", None)
        result = await ann.expect("task_result", timeout=20)
        assert (result["task_id"], result["result"]) == (task_id, 3)
        await ann.silent()


async def test_a_task_running_past_its_timeout_fails_with_task_timeout(node: Shoal) -> None:
    async with client(node.url("ann")) as ann:
        await dispatch(ann, "spin", None)
        failed = await ann.expect("task_failed", timeout=20)
        assert failed["error"] == {"type": "TaskTimeout", "message": "ran longer than 1 s"}
        # The process stuck in the sync function was killed; the pool goes on.
        await dispatch(ann, "slow", {"seconds": 0})
        assert (await ann.expect("task_result", timeout=20))["result"]["attempt"] == 1


async def test_the_result_reaches_the_user_after_they_reconnected_to_another_worker(
    node: Shoal,
) -> None:
    async with client(node.url("ann")) as ann:
        first = ann.worker
        task_id = await dispatch(ann, "slow", {"seconds": 1.5})
    while True:  # SO_REUSEPORT picks the worker: reconnect until another one has ann
        async with client(node.url("ann")) as again:
            if again.worker == first:
                continue
            result = await again.expect("task_result", timeout=20)
            assert result["task_id"] == task_id
            assert result["result"] == {"attempt": 1, "user": "ann"}
            return


async def test_killing_every_task_process_mid_job_still_gives_exactly_one_result(
    node: Shoal,
) -> None:
    async with client(node.url("ann")) as ann:
        wait_until(lambda: len(task_processes()) == 2, 20, "two task processes")
        task_id = await dispatch(ann, "slow", {"seconds": 2})
        status = await ann.request({"type": "task_status", "task_id": task_id}, "task_status")
        await eventually_running(ann, task_id, status)
        for pid in task_processes():
            os.kill(pid, signal.SIGKILL)
        result = await ann.expect("task_result", timeout=30)
        assert result["task_id"] == task_id
        assert result["result"]["attempt"] == 2  # run again once, at once
        await ann.silent(1)


async def eventually_running(ann: Client, task_id: str, status: dict[str, Any]) -> None:
    while status["state"] != "running":
        await asyncio.sleep(0.05)
        status = await ann.request({"type": "task_status", "task_id": task_id}, "task_status")


async def test_a_job_of_a_killed_pool_process_is_taken_over_after_the_visibility_timeout(
    node: Shoal,
) -> None:
    async with client(node.url("ann")) as ann:
        task_id = await dispatch(ann, "slow", {"seconds": 1})
        status = await ann.request({"type": "task_status", "task_id": task_id}, "task_status")
        await eventually_running(ann, task_id, status)
        os.kill(task_pool_pid(node), signal.SIGKILL)
        result = await ann.expect("task_result", timeout=30)
        assert (result["task_id"], result["result"]["attempt"]) == (task_id, 2)
        await ann.silent(1)
    # The old pool's task processes saw their parent go and exited.
    wait_until(lambda: len(task_processes()) == 2, 20, "only the new pool's processes")


async def test_a_full_queue_refuses_dispatch(
    tmp_path: Path, settings: dict[str, Any], task_module: Path
) -> None:
    node = Shoal(tmp_path, tasks_settings(settings, task_worker_num=0, max_pending=2))
    node.start(app_path=task_module)
    try:
        async with client(node.url("ann")) as ann:
            await dispatch(ann, "slow", {"seconds": 0})
            await dispatch(ann, "slow", {"seconds": 0})
            await ann.send({"type": "task", "task": "slow", "data": {"seconds": 0}})
            error = await ann.expect("error")
            assert error["message"].startswith("Task queue full (2 tasks pending")
    finally:
        node.stop()


async def test_a_shoal_tasks_node_runs_jobs_dispatched_from_a_serve_node(
    tmp_path: Path, settings: dict[str, Any], task_module: Path, redis_server: RedisServer
) -> None:
    """Task capacity on another machine: `shoal tasks` in a process group of its own,
    sharing only Redis and the prefix with the WebSocket node, which has no pool."""
    web = Shoal(tmp_path / "web", tasks_settings(settings, task_worker_num=0))
    web.start(app_path=task_module)
    config = tmp_path / "tasks.yaml"
    config.write_text(yaml.safe_dump(tasks_settings(settings, task_worker_num=1)))
    env = {**os.environ, "PYTHONPATH": str(task_module)}
    log = (tmp_path / "tasks.log").open("wb")
    pool = subprocess.Popen(
        [*SHOAL, "tasks", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with client(web.url("ann")) as ann:
            task_id = await dispatch(ann, "process_data", {"numbers": [5]})
            result = await ann.expect("task_result", timeout=30)
            assert (result["task_id"], result["result"]["sum"]) == (task_id, 5)
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(20 * SCALE) == 0
    finally:
        if pool.poll() is None:
            os.killpg(pool.pid, signal.SIGKILL)
        log.close()
        web.stop()
    store = redis.Redis.from_url(redis_server.url)
    queue = f"{settings['redis']['prefix']}:tasks"
    assert store.xlen(queue) == 0  # every finished job left the queue
    assert store.xinfo_consumers(queue, "tasks") == []  # the stopped pool left the group


# An application on the task API: taskwait, taskWaitMulti and onFinish.
APP = textwrap.dedent(
    """
    from typing import Any

    from shoal.core.app import App, Connection, Outcome
    from shoal.core.errors import TaskFailed

    app = App()


    @app.on_open
    async def hello(conn: Connection) -> None:
        await conn.send({"type": "welcome", "user_id": conn.user_id, "connection_id": conn.id})


    @app.on("sum")
    async def sum_(conn: Connection, message: dict[str, Any]) -> None:
        good = await conn.dispatch("process_data", {"numbers": message["numbers"]})
        bad = await conn.dispatch("process_data", {"numbers": []})
        result = await conn.hub.tasks.wait(good)
        try:
            await conn.hub.tasks.wait(bad)
            failed = None
        except TaskFailed as exc:
            failed = [exc.type, exc.message]
        both = await conn.hub.tasks.wait_many([good, bad], timeout=5)
        await conn.send({"type": "sums", "sum": result["sum"], "failed": failed,
                         "both": {k: type(v).__name__ for k, v in both.items()},
                         "ids": [good, bad]})


    @app.on_task_result
    async def finished(conn: Connection, outcome: Outcome) -> None:
        await conn.send({"type": "finished", "task_id": outcome.task_id, "ok": outcome.ok})
    """
)


async def test_an_application_waits_on_tasks_and_hears_each_outcome(
    tmp_path: Path, settings: dict[str, Any], task_module: Path
) -> None:
    (task_module / "taskapp.py").write_text(APP)
    app_settings = {**tasks_settings(settings), "app": {"module": "taskapp"}}
    node = Shoal(tmp_path, app_settings).start(app_path=task_module)
    try:
        async with client(node.url("ann")) as ann:
            await ann.send({"type": "sum", "numbers": [2, 3]})
            got = [await ann.recv(20) for _ in range(3)]
            [sums] = [m for m in got if m["type"] == "sums"]
            good, bad = sums["ids"]
            assert sums["sum"] == 5
            assert sums["failed"] == [
                "ValueError",
                "data.numbers must be a non-empty list of numbers",
            ]
            assert sums["both"] == {good: "dict", bad: "TaskFailed"}
            finished = sorted((m["task_id"], m["ok"]) for m in got if m["type"] == "finished")
            assert finished == sorted([(good, True), (bad, False)])
    finally:
        node.stop()


async def test_sigterm_lets_a_running_job_finish_and_records_its_outcome(
    tmp_path: Path, settings: dict[str, Any], task_module: Path, redis_server: RedisServer
) -> None:
    node = Shoal(tmp_path, tasks_settings(settings)).start(app_path=task_module)
    async with client(node.url("ann")) as ann:
        task_id = await dispatch(ann, "slow", {"seconds": 1.5})
        status = await ann.request({"type": "task_status", "task_id": task_id}, "task_status")
        await eventually_running(ann, task_id, status)
        node.signal(signal.SIGTERM)
        assert node.wait(15) == 0
    store = redis.Redis.from_url(redis_server.url)
    prefix = settings["redis"]["prefix"]
    assert store.hget(f"{prefix}:task:{task_id}", "state") == b"done"
    assert store.xlen(f"{prefix}:tasks") == 0


async def test_redis_restarted_empty_mid_job_loses_neither_the_result_nor_the_pool(
    tmp_path: Path, task_module: Path, own_redis: RedisServer, prefix: str
) -> None:
    """The running job's outcome is recorded and delivered once Redis is back (the
    workers write their connections back); the queue, lost with Redis, is made again by
    the next dispatch, and the pool takes from it."""
    settings = {
        "server": {"worker_num": 2},
        "redis": {"url": own_redis.url, "prefix": prefix, **FAST_REDIS},
    }
    node = Shoal(tmp_path, tasks_settings(settings)).start(app_path=task_module)
    try:
        async with client(node.url("ann")) as ann:
            task_id = await dispatch(ann, "slow", {"seconds": 2})
            status = await ann.request({"type": "task_status", "task_id": task_id}, "task_status")
            await eventually_running(ann, task_id, status)
            own_redis.stop()
            own_redis.start()  # empty
            result = await ann.expect("task_result", timeout=30)
            assert result["task_id"] == task_id
            again = await dispatch(ann, "slow", {"seconds": 0})
            result = await ann.expect("task_result", timeout=30)
            assert result["task_id"] == again
            await ann.silent(1)
    finally:
        node.stop()


async def test_what_is_left_of_a_dead_pool_leaves_the_group(
    node: Shoal, redis_server: RedisServer, prefix: str
) -> None:
    """A pool that died keeps its name in the consumer group; a live pool removes it
    once it is silent and holds nothing (here within 2 x visibility_timeout + a period)."""
    async with client(node.url("ann")) as ann:
        await dispatch(ann, "noop", None)  # the first job makes the queue and its group
        await ann.expect("task_result", timeout=20)
    store = redis_server.client()
    queue = f"{prefix}:tasks"
    store.xgroup_createconsumer(queue, "tasks", "ghost")

    def names() -> set[str]:
        return {consumer["name"] for consumer in store.xinfo_consumers(queue, "tasks")}

    assert "ghost" in names()
    wait_until(lambda: "ghost" not in names(), 15, "the dead pool's name to go")
    assert len(names()) == 1  # the live pool's own


async def test_broadcast_delayed_reaches_every_connection_later(node: Shoal) -> None:
    """A task reaches clients through the workers' bus: everyone, on both workers."""
    async with clients_on_workers(node, ["ann", "bo", "cy"]) as (ann, bo, cy):
        task_id = await dispatch(ann, "broadcast_delayed", {"message": "hi", "delay": 0.5})
        for c in (ann, bo, cy):
            broadcast = await c.expect("broadcast", timeout=20)
            assert (broadcast["from"], broadcast["message"]) == ("ann", "hi")
        result = await ann.expect("task_result", timeout=20)
        assert (result["task_id"], result["result"]) == (task_id, {"delivered_to_workers": 2})


async def test_a_job_unfinished_at_stop_goes_back_to_the_queue_at_once(
    tmp_path: Path, settings: dict[str, Any], task_module: Path, redis_server: RedisServer
) -> None:
    """SIGTERM: a job still running after the drain is handed back, and the next pool
    takes it without waiting for the visibility timeout."""
    stop = {"shutdown_timeout": 4, "close_timeout": 1}
    slow_stop = {**settings, "server": {**settings["server"], **stop}}
    first = Shoal(tmp_path / "a", tasks_settings(slow_stop, visibility_timeout=60))
    first.start(app_path=task_module)
    async with client(first.url("ann")) as ann:
        task_id = await dispatch(ann, "first_run_hangs", None)
        status = await ann.request({"type": "task_status", "task_id": task_id}, "task_status")
        await eventually_running(ann, task_id, status)
        first.signal(signal.SIGTERM)
        assert first.wait(15) == 0
    assert "handing 1 unfinished tasks back to the queue" in first.log()
    second = Shoal(tmp_path / "b", tasks_settings(settings, visibility_timeout=60))
    second.start(app_path=task_module)
    try:
        async with client(second.url("ann")) as ann:

            async def ran_again() -> dict[str, Any] | None:
                await ann.send({"type": "task_status", "task_id": task_id})
                reply = await ann.recv()
                return reply if reply["type"] == "task_result" else None

            # Well within the visibility timeout (60 s): taken at once, not reclaimed.
            reply = await eventually(ran_again, 10, "the handed-back job to run again")
            assert reply["result"] == 2
    finally:
        second.stop()


class Mailbox:
    """An aiosmtpd handler keeping every message it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


async def test_send_email_delivers_a_real_message_over_smtp(
    tmp_path: Path, settings: dict[str, Any], task_module: Path
) -> None:
    mailbox = Mailbox()
    port = free_port()
    smtpd = Controller(mailbox, hostname="127.0.0.1", port=port)
    smtpd.start()
    smtp = {"host": "127.0.0.1", "port": port, "from_address": "noreply@shoal.test"}
    node = Shoal(tmp_path, tasks_settings(settings, smtp=smtp)).start(app_path=task_module)
    try:
        async with client(node.url("ann")) as ann:
            data = {"to": "bo@example.com", "subject": "Hello", "body": "From a task.\n"}
            task_id = await dispatch(ann, "send_email", data)
            result = await ann.expect("task_result", timeout=20)
            assert result["task_id"] == task_id
            assert result["result"]["accepted"] == ["bo@example.com"]
            [(sender, recipients, content)] = mailbox.messages
            assert (sender, recipients) == ("noreply@shoal.test", ["bo@example.com"])
            mail = email.message_from_bytes(content)
            assert (mail["Subject"], mail["To"]) == ("Hello", "bo@example.com")
            assert mail["Message-ID"] == result["result"]["message_id"]
            assert mail["Message-ID"].startswith(f"<{task_id}.")
            assert str(mail.get_payload()).replace("\r\n", "\n") == "From a task.\n"  # SMTP: CRLF
            # A header injection is refused before anything is sent.
            await dispatch(ann, "send_email", {**data, "subject": "Hi\r\nBcc: eve@x.y"})
            failed = await ann.expect("task_failed", timeout=20)
            assert failed["error"]["type"] == "ValueError"
            assert len(mailbox.messages) == 1
    finally:
        node.stop()
        smtpd.stop()


def test_shoal_tasks_refuses_the_embedded_redis(tmp_path: Path) -> None:
    done = subprocess.run([*SHOAL, "tasks"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "redis.url: a task pool alone must use the Redis" in done.stderr
