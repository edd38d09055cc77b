"""Room history and resume, end to end, on real processes: `PersistentClient` in a room
that keeps a history while a sender says a numbered message every 20 ms, through a
rolling reload of every worker, a `kill -9` of its worker and a 10 s network drop. Each
time it ends with every number once, in order, and its rejoin says `recovered: true`.
When the history kept is shorter than the time away, or Redis restarted empty meanwhile,
the rejoin says `recovered: false` with the reason (`recovery_failed`), and nothing is
repeated.

Two nodes share one Redis (and prefix), so they serve as one server: the client is on the
node under test, which is reloaded, killed and cut off; the sender is on the other,
which nothing disturbs (a reload replaces every worker of its node, so a sender on any
worker of the node under test would be closed too, and what it said in that instant
would be in doubt). The sender reads its own messages back: what it read is what the room
said. Each test records what its outage cost (`record_property`): the seconds away and
the messages replayed on the rejoin.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from shoal.client import Disconnected, PersistentClient, RecoveryFailed
from shoal.core.keys import Keys

from support import (
    FAST_REDIS,
    SCALE,
    UNLIMITED,
    BlackholeProxy,
    Client,
    RedisServer,
    Shoal,
    client,
    eventually,
    wait_until,
    workers_replaced,
)

PERIOD = 0.02  # between two numbers of the sender
OUTAGE = 10.0  # the network drop, in seconds
BRIEF = 5  # the history of `brief.*` rooms: shorter than an outage
WINDOW = 200  # how far the flooding sender may run ahead of its own copies
HISTORY = [{"rooms": "brief.*", "size": BRIEF}, {"rooms": "orders.*", "size": 10_000}]

Record = Callable[[str, object], None]


@pytest.fixture(scope="module")
def delivery_redis() -> Iterator[RedisServer]:
    """This module's own Redis: a test restarts it empty."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def two_nodes(
    tmp_path_factory: pytest.TempPathFactory, delivery_redis: RedisServer
) -> Iterator[tuple[Shoal, Shoal]]:
    """(the node under test, the sender's node). The first notices a dead connection in
    a few seconds (`heartbeat_*`) and gives a reload's old clients 1 s to go."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    common: dict[str, Any] = {
        "redis": {"url": delivery_redis.url, "prefix": prefix, **FAST_REDIS},
        "log": {"level": "info"},
        "tasks": {"task_worker_num": 0},
        "limits": UNLIMITED,
        "app": {"history": HISTORY},
    }
    tested = Shoal(
        tmp_path_factory.mktemp("tested"),
        {
            **common,
            "server": {
                "worker_num": 2,
                "reload_grace": 1.0,
                "heartbeat_check_interval": 1.0,
                "heartbeat_idle_time": 3.0,
            },
        },
    )
    sending = Shoal(tmp_path_factory.mktemp("sending"), {**common, "server": {"worker_num": 1}})
    try:
        for node in (tested, sending):
            node.start(wait=False)
        for node in (tested, sending):
            _wait_healthy(node)
        yield tested, sending
    finally:
        for node in (tested, sending):
            node.stop()


@pytest.fixture
def nodes(two_nodes: tuple[Shoal, Shoal]) -> tuple[Shoal, Shoal]:
    """Both nodes, every worker serving (a test before may have replaced some)."""
    for node in two_nodes:
        _wait_healthy(node)
    return two_nodes


@pytest.fixture
def proxy(two_nodes: tuple[Shoal, Shoal]) -> Iterator[BlackholeProxy]:
    """A network between the client and the node under test, which a test can cut."""
    link = BlackholeProxy(two_nodes[0].port)
    yield link
    link.close()


class Sender:
    """A plain websockets client that says `first`, `first + 1`, ... in a room, one every
    `PERIOD`, and reads each back: `said` is what the room said, in order."""

    def __init__(self, c: Client, room: str, first: int) -> None:
        self.client = c
        self.room = room
        self.next = first
        self.said: list[int] = []
        self.departed: list[str] = []  # users the room said left (`user_left_room`)
        self.stopping = asyncio.Event()
        self.tasks = [asyncio.create_task(self._say()), asyncio.create_task(self._read())]

    @property
    def sent(self) -> int:
        """The last number sent."""
        return self.next - 1

    async def _say(self) -> None:
        while not self.stopping.is_set():
            message = {"type": "room_message", "room": self.room, "message": self.next}
            await self.client.send(message)
            self.next += 1
            await asyncio.sleep(PERIOD)

    async def _read(self) -> None:
        while True:
            message = await self.client.recv(timeout=60)
            if message["type"] == "room_message" and message["from"] == "sender":
                self.said.append(message["message"])
            elif message["type"] == "user_left_room":
                self.departed.append(message["user_id"])
            elif message["type"] == "error":
                raise AssertionError(f"the sender was refused: {message}")

    async def stop(self) -> None:
        """Stop saying; return once the last number sent was read back."""
        self.stopping.set()
        await self.tasks[0]

        async def all_said() -> bool:
            if self.tasks[1].done():
                self.tasks[1].result()  # raises what the reader failed with
            return bool(self.said) and self.said[-1] == self.sent

        await eventually(all_said, 10, "the sender's last number")
        self.tasks[1].cancel()


@contextlib.asynccontextmanager
async def sender(node: Shoal, room: str, first: int = 1) -> AsyncIterator[Sender]:
    async with client(node.url("sender")) as c:
        await c.request({"type": "join_room", "room": room}, "joined_room")
        talker = Sender(c, room, first)
        try:
            yield talker
        finally:
            for task in talker.tasks:
                task.cancel()
            await asyncio.gather(*talker.tasks, return_exceptions=True)


class Receiver:
    """The persistent client under test, and what its callbacks got, in order."""

    KINDS = (
        "welcome",
        "room_message",
        "joined_room",
        "recovery_failed",
        "disconnected",
        "reconnected",
    )

    def __init__(self, url: str, **options: Any) -> None:
        self.pc = PersistentClient(url, reconnect_delay=0.2, max_delay=1.0, **options)
        self.events: list[tuple[str, Any, float]] = []
        for kind in self.KINDS:
            self.pc.on(kind, lambda payload, kind=kind: self.record(kind, payload))

    def record(self, kind: str, payload: Any) -> None:
        self.events.append((kind, payload, time.monotonic()))

    def all(self, kind: str) -> list[Any]:
        return [payload for k, payload, _ in self.events if k == kind]

    @property
    def numbers(self) -> list[int]:
        return [m["message"] for m in self.all("room_message") if m["from"] == "sender"]

    @property
    def worker_pid(self) -> int:
        """The worker of the latest connection."""
        return int(self.all("welcome")[-1]["connection_id"].split(".")[2])

    def drops(self) -> list[tuple[int, bool]]:
        """(code, reconnect) of each connection that ended, but the one `close()` ended."""
        ends: list[Disconnected] = self.all("disconnected")
        return [(e.code, e.reconnect) for e in ends if e.code != 1000]

    def rejoins(self) -> list[dict[str, Any]]:
        """The replies to the rejoins with `since`."""
        return [m for m in self.all("joined_room") if "recovered" in m]

    def replayed(self) -> int:
        """The room messages that came on a new connection before its rejoin's reply."""
        count, connected, rejoining = 0, False, False
        for kind, _, _ in self.events:
            if kind == "welcome":
                rejoining, connected = connected, True
            elif kind == "joined_room":
                rejoining = False
            elif kind == "room_message" and rejoining:
                count += 1
        return count

    def rejoined_at(self) -> float:
        """When the latest rejoin was answered."""
        return max(at for kind, p, at in self.events if kind == "joined_room" and "recovered" in p)

    async def wait(self, what: str, check: Callable[[], bool], timeout: float = 15) -> None:
        async def done() -> bool:
            return check()

        await eventually(done, timeout, what)

    async def wait_numbers(self, count: int) -> None:
        await self.wait(f"{count} numbers", lambda: len(self.numbers) >= count)

    async def wait_rejoined(self, on: Callable[[int], bool] = lambda pid: True) -> None:
        """Until the latest connection, on a worker whose pid passes `on`, rejoined."""

        def rejoined() -> bool:
            kinds = [kind for kind, _, _ in self.events]
            last_welcome = len(kinds) - 1 - kinds[::-1].index("welcome")
            answered = any(
                kind == "joined_room" and "recovered" in p
                for kind, p, _ in self.events[last_welcome:]
            )
            return answered and on(self.worker_pid)

        await self.wait("the rejoin", rejoined, timeout=30)

    async def wait_for(self, last: int) -> None:
        """Until `last`, the sender's last number, arrived."""
        await self.wait(f"number {last}", lambda: last in self.numbers)


@contextlib.asynccontextmanager
async def receiver(url: str, room: str, **options: Any) -> AsyncIterator[Receiver]:
    rx = Receiver(url, **options)
    await rx.pc.start()
    first = await rx.pc.join_room(room)
    assert "recovered" not in first and first["offset"] == "0-0"
    try:
        yield rx
    finally:
        await rx.pc.close()


def record_figures(record: Record, rx: Receiver, away_from: float, said: int) -> None:
    """What the outage cost: seconds from the disturbance to the rejoin's reply, the
    client's own downtime, the messages replayed, and the numbers said in all."""
    record("away_s", round(rx.rejoined_at() - away_from, 3))
    record("client_downtime_s", round(sum(e.downtime for e in rx.all("reconnected")), 3))
    record("replayed", rx.replayed())
    record("said", said)


def assert_each_once_in_order(rx: Receiver, talker: Sender) -> None:
    assert talker.said == list(range(1, talker.sent + 1))
    assert rx.numbers == talker.said
    rejoins = rx.rejoins()
    assert rejoins and all(r["recovered"] is True for r in rejoins), rejoins
    assert rx.all("recovery_failed") == []


async def test_a_rolling_reload_of_every_worker_loses_nothing(
    nodes: tuple[Shoal, Shoal], record_property: Record
) -> None:
    tested, sending = nodes
    room = "orders.reload"
    async with receiver(tested.url("reloaded"), room) as rx, sender(sending, room) as talker:
        await rx.wait_numbers(10)
        old = set(tested.worker_pids())
        hup = time.monotonic()
        tested.signal(signal.SIGHUP)
        new = await asyncio.to_thread(
            wait_until, lambda: workers_replaced(tested, old), 30, "new workers"
        )
        await rx.wait_rejoined(lambda pid: pid in new)
        await rx.wait_numbers(len(rx.numbers) + 10)  # live again
        await talker.stop()
        await rx.wait_for(talker.sent)
    assert set(rx.drops()) == {(1012, True)}
    assert_each_once_in_order(rx, talker)
    record_figures(record_property, rx, hup, talker.sent)


async def test_kill_9_of_the_clients_worker_loses_nothing(
    nodes: tuple[Shoal, Shoal], record_property: Record
) -> None:
    tested, sending = nodes
    room = "orders.kill"
    async with receiver(tested.url("killed"), room) as rx, sender(sending, room) as talker:
        await rx.wait_numbers(10)
        victim = rx.worker_pid
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        await rx.wait_rejoined(lambda pid: pid != victim)
        await rx.wait_numbers(len(rx.numbers) + 10)
        await talker.stop()
        await rx.wait_for(talker.sent)
    assert rx.drops() == [(1006, True)]
    assert_each_once_in_order(rx, talker)
    record_figures(record_property, rx, killed, talker.sent)


async def test_a_10_s_network_drop_loses_nothing(
    nodes: tuple[Shoal, Shoal], proxy: BlackholeProxy, record_property: Record
) -> None:
    """The network drops every byte, in both directions, with no FIN or RST: the client
    learns it from its pings, the server from its idle check; the client comes back
    through the network when it is back, and resumes."""
    _, sending = nodes
    room = "orders.drop"
    url = f"ws://127.0.0.1:{proxy.port}/ws?user_id=dropped"
    pings = {"ping_interval": 1.0, "ping_timeout": 1.0, "close_timeout": 1.0, "open_timeout": 1.0}
    async with receiver(url, room, **pings) as rx, sender(sending, room) as talker:
        await rx.wait_numbers(10)
        cut = time.monotonic()
        assert proxy.cut() == 1
        await rx.wait("the client to notice", lambda: bool(rx.all("disconnected")))
        noticed = _first_at(rx, "disconnected") - cut
        # Within ping_interval + ping_timeout + close_timeout.
        assert noticed < 3.0 + 1.0 * SCALE
        # The server closed its end too (heartbeat_idle_time), and told the room.
        await rx.wait("the server to notice", lambda: "dropped" in talker.departed)
        assert rx.pc.connected is False
        await asyncio.sleep(cut + OUTAGE - time.monotonic())  # the outage, not a wait
        assert len(rx.all("welcome")) == 1  # nothing got through meanwhile
        proxy.mend()
        await rx.wait_rejoined()
        await rx.wait_numbers(len(rx.numbers) + 10)
        await talker.stop()
        await rx.wait_for(talker.sent)
    assert rx.drops() == [(1006, True)]  # no close frame came: the pings timed out
    assert_each_once_in_order(rx, talker)
    record_figures(record_property, rx, cut, talker.sent)
    record_property("noticed_by_client_s", round(noticed, 3))


async def test_a_history_shorter_than_the_outage_says_offset_too_old(
    nodes: tuple[Shoal, Shoal],
    proxy: BlackholeProxy,
    delivery_redis: RedisServer,
    record_property: Record,
) -> None:
    tested, sending = nodes
    room = "brief.away"
    url = f"ws://127.0.0.1:{proxy.port}/ws?user_id=brief"
    pings = {"ping_interval": 0.5, "ping_timeout": 0.5, "close_timeout": 0.5, "open_timeout": 1.0}
    keys = Keys(tested.settings["redis"]["prefix"])
    redis = delivery_redis.client()
    async with receiver(url, room, **pings) as rx, sender(sending, room) as talker:
        await rx.wait_numbers(10)
        cut = time.monotonic()
        proxy.cut()
        await rx.wait("the client to notice", lambda: bool(rx.all("disconnected")))
        left = rx.pc.position(room)
        assert left is not None
        last = rx.numbers[-1]

        def trimmed_past_the_client() -> bool:
            entries = redis.xrange(keys.history(room), count=1)
            assert entries, "the room's history is gone"
            return int(str(entries[0][0]).split("-")[0]) > left.number + 1

        # Redis trims a stream by whole nodes (`MAXLEN ~`): it may keep more than BRIEF.
        await rx.wait("the history to move past the client", trimmed_past_the_client, 30)
        missed = talker.sent
        proxy.mend()
        await rx.wait_rejoined()
        await rx.wait_numbers(len(rx.numbers) + 10)
        await talker.stop()
        await rx.wait_for(talker.sent)
    (failed,) = rx.all("recovery_failed")
    assert isinstance(failed, RecoveryFailed) and failed.room == room
    assert failed.reason.startswith("offset too old"), failed.reason
    (rejoin,) = rx.rejoins()
    assert (rejoin["recovered"], rejoin["reason"]) == (False, failed.reason)
    _assert_a_gap_and_no_repeat(rx.numbers, last, missed, talker)
    record_figures(record_property, rx, cut, talker.sent)
    record_property("lost", missed - last)


async def test_redis_restarted_empty_says_epoch_changed(
    nodes: tuple[Shoal, Shoal],
    proxy: BlackholeProxy,
    delivery_redis: RedisServer,
    record_property: Record,
) -> None:
    _, sending = nodes
    room = "orders.lost"
    url = f"ws://127.0.0.1:{proxy.port}/ws?user_id=forgotten"
    pings = {"ping_interval": 0.5, "ping_timeout": 0.5, "close_timeout": 0.5, "open_timeout": 1.0}
    async with receiver(url, room, **pings) as rx:
        async with sender(sending, room) as before:
            await rx.wait_numbers(10)
            cut = time.monotonic()
            proxy.cut()
            await rx.wait("the client to notice", lambda: bool(rx.all("disconnected")))
            await before.stop()
        first_epoch = rx.pc.position(room)
        assert first_epoch is not None
        last = rx.numbers[-1]
        delivery_redis.stop()
        for node in nodes:
            wait_until(lambda n=node: (n.health() or {}).get("http_status") == 503, 10, "outage")
        delivery_redis.start()  # empty
        for node in nodes:
            _wait_healthy(node)
        async with sender(sending, room, first=before.sent + 1) as after:
            await rx.wait("the room to speak again", lambda: len(after.said) >= 5)
            missed = after.sent
            proxy.mend()
            await rx.wait_rejoined()
            await rx.wait_numbers(len(rx.numbers) + 10)
            await after.stop()
            await rx.wait_for(after.sent)
    (failed,) = rx.all("recovery_failed")
    assert failed.room == room and failed.reason.startswith("epoch changed"), failed.reason
    (rejoin,) = rx.rejoins()
    assert rejoin["recovered"] is False and rejoin["epoch"] != first_epoch.epoch
    now = rx.pc.position(room)
    assert now is not None and now.epoch == rejoin["epoch"]
    said = before.said + after.said
    assert said == list(range(1, after.sent + 1))
    _assert_a_gap_and_no_repeat(rx.numbers, last, missed, after)
    record_figures(record_property, rx, cut, after.sent)
    record_property("lost", missed - last)


def _assert_a_gap_and_no_repeat(numbers: list[int], last: int, missed: int, talker: Sender) -> None:
    """Up to `last` before the outage, then a gap past `missed` (said while away, not
    replayed), then every number to the end, once each, in order."""
    assert len(numbers) == len(set(numbers)) and numbers == sorted(numbers)
    resumed = numbers.index(last) + 1
    assert numbers[:resumed] == list(range(1, last + 1))
    after = numbers[resumed:]
    assert after and after[0] > missed
    assert after == list(range(after[0], talker.sent + 1))


def _first_at(rx: Receiver, kind: str) -> float:
    return min(at for k, _, at in rx.events if k == kind)


def _wait_healthy(node: Shoal) -> None:
    wait_until(lambda: node.health(expect_ok=True), 15, f"every worker of :{node.port} serving")


async def test_a_new_join_gets_everything_after_the_offset_its_reply_gives(
    nodes: tuple[Shoal, Shoal], delivery_redis: RedisServer
) -> None:
    """`joined_room`'s offset is where the client stands: it gets every message after
    it. Joins and leaves over and over while a sender says as fast as it can, until a
    message after a reply's offset never came (or a number of tries)."""
    tested, sending = nodes
    room = "orders.race"
    keys = Keys(tested.settings["redis"]["prefix"])
    redis = delivery_redis.client()
    async with (
        client(sending.url("sender")) as blaster,
        client(tested.url("joiner")) as joiner,
    ):
        await blaster.request({"type": "join_room", "room": room}, "joined_room")
        flood = asyncio.create_task(_flood(blaster, room))
        try:
            for _ in range(100):
                await joiner.send({"type": "join_room", "room": room})
                got = await _until(joiner, "joined_room")
                after = int(got.pop()["offset"].split("-")[0])
                try:
                    got += await _until(joiner, "room_message")
                except TimeoutError:
                    if flood.done():  # not the joiner's loss: the sender stopped
                        raise AssertionError("the flood stopped") from flood.exception()
                    raise
                await joiner.send({"type": "leave_room", "room": room})
                got += await _until(joiner, "left_room")
                came = {m["offset"] for m in got if m["type"] == "room_message"}
                last = max(came, key=lambda offset: int(offset.split("-")[0]))
                kept = redis.xrange(keys.history(room), f"({after}-0", last) or []
                said = [e for e, fields in kept if '"from":"sender"' in str((fields or {})["m"])]
                missed = [offset for offset in said if offset not in came]
                assert missed == [], f"after {after}-0, {len(missed)} never came: {missed[:3]}"
        finally:
            flood.cancel()
            await asyncio.gather(flood, return_exceptions=True)


async def _flood(sender: Client, room: str) -> None:
    """Room messages as fast as the sender's node takes them, but never more than
    `WINDOW` ahead of what has come back to the sender: a test process slower than the
    server (coverage, a busy machine) would otherwise leave the sender's own copies
    unread until the server cut it off as a slow consumer, and the flood would stop."""
    back = 0
    moved = asyncio.Event()

    async def read() -> None:
        nonlocal back
        async for raw in sender.ws:
            message = json.loads(raw)
            if message.get("type") == "room_message" and message.get("from") == "sender":
                back += 1
                moved.set()

    reader = asyncio.create_task(read())
    try:
        for n in itertools.count(1):
            while n - back > WINDOW:
                moved.clear()
                await moved.wait()
            await sender.send({"type": "room_message", "room": room, "message": n})
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _until(c: Client, kind: str) -> list[dict[str, Any]]:
    """What `c` receives up to the first message of type `kind`, that one included."""
    got = [await c.recv(timeout=10)]
    while got[-1]["type"] != kind:
        got.append(await c.recv(timeout=10))
    return got
