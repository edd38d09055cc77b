"""`PersistentClient` resumes the rooms that keep a history, against live two-worker
servers: after its worker is killed it rejoins from the last offset it saw, the messages
it missed reach the same callbacks as live ones, before the rejoin's reply; a room whose
history was lost raises `recovery_failed`; a room without a history is rejoined as new."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal.client import PersistentClient, Position, Reconnected, RecoveryFailed
from shoal.core.keys import Keys

from support import Client, RedisServer, Shoal, client, eventually

HISTORY = [{"rooms": "orders.*", "size": 100}]


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    settings["app"] = {"history": HISTORY}
    return settings


class Recorder:
    """What a client's callbacks got, in order: (event or message type, payload)."""

    EVENTS = ("welcome", "room_message", "joined_room", "reconnected", "recovery_failed")

    def __init__(self, pc: PersistentClient) -> None:
        self.events: list[tuple[str, Any]] = []
        for name in self.EVENTS:
            pc.on(name, lambda payload, name=name: self.events.append((name, payload)))

    def all(self, name: str) -> list[Any]:
        return [payload for event, payload in self.events if event == name]

    def said(self, room: str) -> list[Any]:
        return [m["message"] for m in self.all("room_message") if m["room"] == room]

    async def wait(self, name: str, count: int = 1, timeout: float = 15) -> Any:
        async def arrived() -> bool:
            return len(self.all(name)) >= count

        await eventually(arrived, timeout, f"{count} {name} event(s)")
        return self.all(name)[count - 1]


class Gate:
    """The client's sleep between attempts, held until the test opens it."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        await self.open.wait()


@contextlib.asynccontextmanager
async def sender_off(node: Shoal, worker: str, rooms: list[str]) -> AsyncIterator[Client]:
    """A plain websockets client in `rooms`, on another worker than `worker`."""
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(100):
            c = await stack.enter_async_context(client(node.url("sender")))
            if c.worker != worker:
                for room in rooms:
                    await c.request({"type": "join_room", "room": room}, "joined_room")
                yield c
                return
        raise AssertionError("no connection landed on another worker")


async def say(sender: Client, room: str, text: str) -> dict[str, Any]:
    """Send a room message and return it as the room delivered it (the sender's copy)."""
    await sender.send({"type": "room_message", "room": room, "message": text})
    while True:
        message = await sender.recv()
        if message["type"] == "room_message" and message["message"] == text:
            return message


async def started(node: Shoal, gate: Gate, *rooms: str) -> tuple[PersistentClient, Recorder]:
    pc = PersistentClient(node.url("pc"), reconnect_delay=0.2, sleep=gate)
    events = Recorder(pc)
    await pc.start()
    for room in rooms:
        await pc.join_room(room)
    return pc, events


def kill_worker_of(events: Recorder) -> str:
    """SIGKILL the worker of the client's latest connection; return that worker's id."""
    worker: str = events.all("welcome")[-1]["connection_id"].rsplit(".", 1)[0]
    os.kill(int(worker.split(".")[2]), signal.SIGKILL)
    return worker


async def test_missed_messages_reach_the_callbacks_before_the_rejoin_reply(
    shoal: Shoal,
) -> None:
    gate = Gate()
    pc, events = await started(shoal, gate, "orders.1", "plain")
    first = await events.wait("welcome")
    worker = first["connection_id"].rsplit(".", 1)[0]
    async with sender_off(shoal, worker, ["orders.1", "plain"]) as sender:
        before = await say(sender, "orders.1", "before")
        await eventually(_said(events, "orders.1", ["before"]), 10, "the live message")
        assert pc.position("orders.1") == Position(before["offset"], before["epoch"])
        assert pc.position("plain") is None  # no history there: nothing to resume from
        kill_worker_of(events)
        await eventually(_disconnected(pc), 10, "the client to see the kill")
        mark = len(events.events)
        missed = [await say(sender, "orders.1", f"m{n}") for n in range(3)]
        await say(sender, "plain", "lost")
        gate.open.set()
        back: Reconnected = await events.wait("reconnected")
        assert back.rejoined == ("orders.1", "plain")
        after = await say(sender, "orders.1", "after")
        everything = ["before", "m0", "m1", "m2", "after"]
        await eventually(_said(events, "orders.1", everything), 10, "every message")
    assert events.said("plain") == []  # at most once there, as before
    # In order: the replay, the rejoin's replies (recovered), then the live messages.
    rejoin = events.events[mark:]
    kinds = [kind if kind != "room_message" else p["message"] for kind, p in rejoin]
    assert kinds == [
        "welcome", "m0", "m1", "m2", "joined_room", "joined_room", "reconnected", "after"
    ]  # fmt: skip
    assert [p["offset"] for _, p in rejoin[1:4]] == [m["offset"] for m in missed]
    replies = {p["room"]: p for kind, p in rejoin if kind == "joined_room"}
    assert replies["orders.1"]["recovered"] is True and "reason" not in replies["orders.1"]
    assert "recovered" not in replies["plain"] and "offset" not in replies["plain"]
    assert pc.position("orders.1") == Position(after["offset"], after["epoch"])
    assert events.all("recovery_failed") == []
    await pc.close()


async def test_a_room_whose_history_was_lost_raises_recovery_failed(
    shoal: Shoal, redis_server: RedisServer
) -> None:
    gate = Gate()
    pc, events = await started(shoal, gate, "orders.2")
    first = await events.wait("welcome")
    worker = first["connection_id"].rsplit(".", 1)[0]
    async with sender_off(shoal, worker, ["orders.2"]) as sender:
        before = await say(sender, "orders.2", "before")
        await eventually(_said(events, "orders.2", ["before"]), 10, "the live message")
        kill_worker_of(events)
        await eventually(_disconnected(pc), 10, "the client to see the kill")
        # What Redis losing the room's history leaves: the next message starts an epoch.
        keys = Keys(shoal.settings["redis"]["prefix"])
        redis_server.client().delete(keys.history("orders.2"), keys.history_meta("orders.2"))
        unseen = await say(sender, "orders.2", "unseen")
        assert unseen["epoch"] != before["epoch"] and unseen["offset"] == "1-0"
        gate.open.set()
        failed: RecoveryFailed = await events.wait("recovery_failed")
        after = await say(sender, "orders.2", "after")
        await eventually(_said(events, "orders.2", ["before", "after"]), 10, "the live message")
    assert failed.room == "orders.2"
    assert failed.reason.startswith("epoch changed"), failed.reason
    reply = events.all("joined_room")[-1]
    assert (reply["recovered"], reply["reason"], reply["epoch"]) == (
        False,
        failed.reason,
        unseen["epoch"],
    )
    # The event follows the reply it comes from; nothing was replayed before it.
    kinds = [kind for kind, _ in events.events]
    assert kinds[kinds.index("recovery_failed") - 1] == "joined_room"
    assert events.said("orders.2") == ["before", "after"]
    assert pc.position("orders.2") == Position(after["offset"], after["epoch"])
    await pc.close()


async def test_leaving_a_room_forgets_where_the_client_stood(shoal: Shoal) -> None:
    """Joined again later, a room is joined as new: what it said while the client was out
    of it is not the client's to get."""
    pc, events = await started(shoal, Gate(), "orders.3")
    async with client(shoal.url("sender")) as sender:
        await sender.request({"type": "join_room", "room": "orders.3"}, "joined_room")
        said = await say(sender, "orders.3", "in")
        await eventually(_said(events, "orders.3", ["in"]), 10, "the live message")
        assert pc.position("orders.3") == Position(said["offset"], said["epoch"])
        await pc.leave_room("orders.3")
        assert pc.position("orders.3") is None
        await say(sender, "orders.3", "out")
        again = await pc.join_room("orders.3")
    assert "recovered" not in again
    assert pc.position("orders.3") == Position(again["offset"], again["epoch"])
    assert events.said("orders.3") == ["in"]
    await pc.close()


def _said(events: Recorder, room: str, expected: list[Any]) -> Any:
    async def check() -> bool:
        return events.said(room) == expected

    return check


def _disconnected(pc: PersistentClient) -> Any:
    async def check() -> bool:
        return not pc.connected

    return check
