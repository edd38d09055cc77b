"""`shoal.client.PersistentClient` against live two-worker servers: a worker killed with
`kill -9`, a whole server stopped and started again on the same port, a kick, a refused
token, the queue's policies, callbacks and request/reply."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from shoal.client import (
    AuthenticationFailed,
    ConnectionClosed,
    Disconnected,
    ErrorReply,
    GaveUp,
    HandshakeRefused,
    PersistentClient,
    QueueFull,
    Reconnected,
    State,
    TaskFailed,
    TimedOut,
)
from shoal.core import schema

from support import SCALE, Client, Shoal, client, eventually

Sign = Callable[..., str]
EVENTS = ("connected", "disconnected", "reconnecting", "reconnected", "error", "welcome")


class Recorder:
    """Every event of a client, in order, for the test to wait on."""

    def __init__(self, pc: PersistentClient) -> None:
        self.events: list[tuple[str, Any]] = []
        for name in EVENTS:
            pc.on(name, functools.partial(self.record, name))

    def record(self, name: str, payload: Any) -> None:
        self.events.append((name, payload))

    def all(self, name: str) -> list[Any]:
        return [payload for event, payload in self.events if event == name]

    async def wait(self, name: str, count: int = 1, timeout: float = 10) -> Any:
        async def arrived() -> bool:
            return len(self.all(name)) >= count

        await eventually(arrived, timeout, f"{count} {name} event(s)")
        return self.all(name)[count - 1]


class Gate:
    """The client's sleep between attempts, held until the test opens it: the test then
    knows the client is disconnected while it sends. Records each delay asked for."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.open = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await self.open.wait()


async def room_messages(observer: Client, count: int) -> list[Any]:
    """The next `count` room messages the observer receives (skipping presence noise)."""
    got: list[Any] = []
    while len(got) < count:
        message = await observer.recv(timeout=15)
        if message["type"] == "room_message":
            got.append(message["message"])
    return got


@contextlib.asynccontextmanager
async def observer_off(node: Shoal, worker: str, room: str) -> AsyncIterator[Client]:
    """A plain websockets client in `room`, on another worker than `worker`."""
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(100):
            c = await stack.enter_async_context(client(node.url("observer")))
            if c.worker != worker:
                await c.request({"type": "join_room", "room": room}, "joined_room")
                yield c
                return
        raise AssertionError("no connection landed on another worker")


async def test_it_survives_kill_9_of_its_worker_and_sends_the_queue_after_rejoining(
    shoal: Shoal, record_property: Callable[[str, object], None]
) -> None:
    gate = Gate()
    pc = PersistentClient(shoal.url("pc"), reconnect_delay=0.2, sleep=gate)
    events = Recorder(pc)
    await pc.start()
    welcome = await events.wait("welcome")
    await pc.join_room("r")
    worker = welcome["connection_id"].rsplit(".", 1)[0]
    async with observer_off(shoal, worker, "r") as observer:
        os.kill(int(worker.split(".")[2]), signal.SIGKILL)
        killed_at = time.monotonic()
        await events.wait("reconnecting")
        dropped: Disconnected = events.all("disconnected")[0]
        assert (dropped.code, dropped.reconnect) == (1006, True)
        assert pc.state is State.CONNECTING
        for i in range(3):
            assert await pc.send({"type": "room_message", "room": "r", "message": i}) is False
        assert pc.queued == 3
        gate.open.set()
        back: Reconnected = await events.wait("reconnected", timeout=15)
        # Only its own messages reach the room: delivered, so it was in the room again
        # before they went out, and in the order they were sent.
        assert await room_messages(observer, 3) == [0, 1, 2]
    assert (back.rejoined, back.sent, back.dropped) == (("r",), 3, 0)
    assert 0 < back.downtime < time.monotonic() - killed_at + 1
    assert pc.rooms == ("r",) and pc.queued == 0
    assert len(events.all("welcome")) == 2
    record_property("downtime_after_kill_9_s", round(back.downtime, 3))
    await pc.close()


async def test_it_survives_a_full_restart_on_the_same_port(
    shoal: Shoal, record_property: Callable[[str, object], None]
) -> None:
    gate = Gate()
    pc = PersistentClient(shoal.url("pc"), reconnect_delay=0.5, sleep=gate)
    events = Recorder(pc)
    await pc.start()
    await pc.join_room("r")
    await pc.subscribe("news")
    await pc.request({"type": "set_metadata", "metadata": {"mood": "calm"}}, "metadata_updated")
    stopped_at = time.monotonic()
    await asyncio.to_thread(shoal.stop)  # SIGTERM: every client is told 1001
    await events.wait("reconnecting")
    dropped: Disconnected = events.all("disconnected")[0]
    assert (dropped.code, dropped.advice.reconnect) == (1001, schema.Reconnect.PROMPTLY)
    assert gate.delays[0] <= 0.5  # promptly: the first delay is drawn from [0, 0.5]
    for i in range(3):
        assert await pc.send({"type": "room_message", "room": "r", "message": f"q{i}"}) is False
    await asyncio.to_thread(shoal.start)
    async with client(shoal.url("observer")) as observer:
        await observer.request({"type": "join_room", "room": "r"}, "joined_room")
        gate.open.set()
        back: Reconnected = await events.wait("reconnected", timeout=20)
        assert await room_messages(observer, 3) == ["q0", "q1", "q2"]
        # The channel and the metadata came back too.
        presence = await observer.request({"type": "presence", "room": "r"}, "presence")
        (entry,) = [u for u in presence["users"] if u["user_id"] == "pc"]
        assert entry["metadata"] == {"mood": "calm"}
        await observer.send({"type": "publish", "channel": "news", "message": "extra"})
    assert (back.rejoined, back.resubscribed, back.sent) == (("r",), ("news",), 3)
    assert back.downtime <= time.monotonic() - stopped_at
    record_property("downtime_after_restart_s", round(back.downtime, 3))
    record_property("reconnect_attempts_after_restart", back.attempts)
    second = await events.wait("connected", count=2)
    assert second.reconnection
    await pc.close()


async def test_a_kicked_client_does_not_reconnect(chat: Shoal, sign: Sign) -> None:
    pc = PersistentClient(f"ws://127.0.0.1:{chat.port}/ws", token=sign("target"))
    events = Recorder(pc)
    await pc.start()
    moderator = f"ws://127.0.0.1:{chat.port}/ws?token={sign('mod', 'moderator')}"
    async with client(moderator, welcome="authenticated") as mod:
        kick = {"type": "kick_user", "user_id": "target", "reason": "spam"}
        assert (await mod.request(kick, "user_kicked"))["connections"] == 1
    with pytest.raises(GaveUp) as caught:
        async with asyncio.timeout(10 * SCALE):
            await pc.wait_closed()  # returns only once the run loop is over for good
    cause = caught.value.__cause__
    assert isinstance(cause, ConnectionClosed) and (cause.code, cause.reason) == (4003, "kicked")
    assert pc.state is State.CLOSED
    with pytest.raises(ConnectionClosed):
        await pc.send({"type": "ping"})
    await pc.close()  # runs the callbacks still queued
    (dropped,) = events.all("disconnected")
    assert (dropped.code, dropped.reconnect) == (4003, False)
    assert len(events.all("connected")) == 1 and events.all("reconnecting") == []


async def test_a_refused_token_stops_at_once_with_an_authentication_error(chat: Shoal) -> None:
    pc = PersistentClient(f"ws://127.0.0.1:{chat.port}/ws", token="not.a.token")
    events = Recorder(pc)
    with pytest.raises(GaveUp) as caught:
        await pc.start()
    cause = caught.value.__cause__
    assert isinstance(cause, AuthenticationFailed)
    assert (cause.status, cause.reason) == (401, "malformed token")
    await pc.close()
    assert len(events.all("error")) == 1 and events.all("reconnecting") == []


async def test_the_queue_raises_or_drops_the_oldest_when_full(shoal: Shoal) -> None:
    strict = PersistentClient(shoal.url("strict"), max_queue=2)
    lenient = PersistentClient(shoal.url("lenient"), max_queue=2, queue_policy="drop_oldest")
    for pc in (strict, lenient):  # not started: every send queues
        for i in range(2):
            assert await pc.send({"type": "private", "to": "observer", "message": i}) is False
    with pytest.raises(QueueFull):
        await strict.send({"type": "private", "to": "observer", "message": 2})
    assert await lenient.send({"type": "private", "to": "observer", "message": 2}) is False
    assert (strict.queued, strict.dropped, lenient.queued, lenient.dropped) == (2, 0, 2, 1)
    async with client(shoal.url("observer")) as observer:
        for pc, expected in ((strict, [0, 1]), (lenient, [1, 2])):
            await pc.start()
            got = [(await observer.expect("private_message"))["message"] for _ in expected]
            assert got == expected
            await pc.close()


async def test_sync_and_async_callbacks_run_in_order_and_errors_reach_on_error(
    shoal: Shoal,
) -> None:
    pc = PersistentClient(shoal.url("cb"))
    seen: list[tuple[str, Any]] = []
    errors: list[BaseException] = []
    pc.on("echo", lambda message: seen.append(("sync", message["data"]["n"])))

    @pc.on("echo")
    async def slower(message: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)
        seen.append(("async", message["data"]["n"]))

    def failing(message: dict[str, Any]) -> None:
        raise RuntimeError(f"callback failed on {message['data']['n']}")

    pc.on("echo", failing)
    pc.on("error", errors.append)
    pc.on("binary", lambda data: seen.append(("binary", data)))
    everything: list[Any] = []
    pc.on("message", everything.append)
    async with pc:
        for n in (1, 2):
            await pc.send({"type": "ping", "n": n})
        await pc.send(b"\x00raw")
        await pc.send({"type": "leave_room", "room": "never-joined"})  # no request claims it

        async def done() -> bool:
            return len(seen) == 5 and len(errors) == 3

        await eventually(done, 10, "every callback")
    assert seen == [("sync", 1), ("async", 1), ("sync", 2), ("async", 2), ("binary", b"\x00raw")]
    # A callback's failure is reported when it happens, after the events read before it.
    failures = [str(e) for e in errors if isinstance(e, RuntimeError)]
    assert failures == ["callback failed on 1", "callback failed on 2"]
    (refusal,) = [e for e in errors if isinstance(e, ErrorReply)]
    assert refusal.message == "Not in room"
    assert [m["type"] for m in everything] == ["welcome", "echo", "echo", "error"]


async def test_request_matches_replies_and_task_results_by_id(chat: Shoal) -> None:
    pc = PersistentClient(f"ws://127.0.0.1:{chat.port}/ws", request_timeout=30 * SCALE)
    # Sent before the client is connected: queued, then answered.
    await pc.start(wait=False)
    joined = await pc.join_room("lobby")
    assert joined["room"] == "lobby" and pc.rooms == ("lobby",)
    crunch = {"type": "task", "task": "process_data", "data": {"numbers": [5, 1, 3]}}
    await pc.send(crunch)  # its task_dispatched must not be taken for the next request's
    both = await asyncio.gather(
        pc.request({**crunch, "data": {"numbers": [1, 2, 3, 4]}}, "task_result"),
        pc.request({**crunch, "data": {"numbers": [10]}}, "task_result"),
    )
    assert [reply["result"]["sum"] for reply in both] == [10, 10]
    assert both[0]["task_id"] != both[1]["task_id"]
    with pytest.raises(TaskFailed) as failed:
        await pc.request({**crunch, "data": {"numbers": "nope"}}, "task_result")
    assert failed.value.task_id
    with pytest.raises(ErrorReply) as refused:
        await pc.request({"type": "subscribe"}, "subscribed")
    assert refused.value.message == "Missing channel"
    with pytest.raises(TimedOut):
        await pc.request({"type": "ping"}, "no_such_reply", timeout=0.3)
    # The abandoned request does not steal the next reply of another type.
    echo = await pc.request({"type": "ping", "n": 7}, "echo")
    assert echo["data"] == {"type": "ping", "n": 7}
    await pc.close()
    with pytest.raises(ConnectionClosed):
        await pc.request({"type": "ping"}, "echo")


async def test_a_full_server_is_retried_until_it_has_room(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """503 (server.max_connection reached) is worth retrying, unlike 401 or 403."""
    settings["server"]["max_connection"] = 1
    node = Shoal(tmp_path, settings).start()
    try:
        pc = PersistentClient(node.url("second"), reconnect_delay=0.05, max_delay=0.2)
        events = Recorder(pc)
        async with client(node.url("first")):
            await pc.start(wait=False)
            await events.wait("reconnecting", count=2)
        await events.wait("connected", timeout=15)
        refusals = [r.cause for r in events.all("reconnecting")]
        assert refusals and all(
            isinstance(c, HandshakeRefused) and c.status == 503 for c in refusals
        )
        assert pc.connected
        await pc.close()
    finally:
        node.stop()
