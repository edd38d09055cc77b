"""Redis failing in every way a production Redis does, against real shoal nodes.

Each test reproduces a failure that once lost state or took a node down: error replies
(OOM, BUSY, READONLY, LOADING, NOPERM), a worker dying while Redis is away, a frozen
Redis, a half-open connection, departures during an outage. After each, the node must
keep every live connection's state and serve again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support import (
    SCALE,
    BlackholeProxy,
    Client,
    RedisServer,
    Shoal,
    client,
    clients_on_workers,
    eventually,
    join,
    wait_until,
)

# A Lua loop that holds Redis for ARGV[1] seconds: other clients get BUSY meanwhile.
_BUSY_SCRIPT = """
local t = redis.call('TIME')
local start = t[1] + t[2] / 1e6
while true do
  t = redis.call('TIME')
  if t[1] + t[2] / 1e6 - start > tonumber(ARGV[1]) then return 1 end
end
"""
_CONDITION_SECONDS = 3.0  # past a heartbeat TTL/2 (1.5 s here), within ttl + a sweep


@contextlib.contextmanager
def out_of_memory(own: RedisServer) -> Iterator[None]:
    own.client().config_set("maxmemory", 1)  # writes answer OOM; reads and PUBLISH work
    try:
        yield
    finally:
        own.client().config_set("maxmemory", 0)


@contextlib.contextmanager
def busy(own: RedisServer) -> Iterator[None]:
    own.client().config_set("busy-reply-threshold", 100)
    done = threading.Event()

    def hold() -> None:
        with redis.Redis(port=own.port, socket_timeout=30) as script:
            script.eval(_BUSY_SCRIPT, 0, _CONDITION_SECONDS)
        done.set()

    threading.Thread(target=hold, daemon=True).start()
    wait_until(lambda: not own.answers(), 2, "redis to answer BUSY")
    yield
    done.wait(10 * SCALE)


@contextlib.contextmanager
def read_only(own: RedisServer) -> Iterator[None]:
    """A failover gone wrong: the address now leads to a replica (of an empty primary)."""
    primary = RedisServer()
    primary.start("--repl-diskless-sync-delay", "0")  # default: wait 5 s for more replicas
    try:
        own.client().replicaof("127.0.0.1", primary.port)
        wait_until(
            lambda: own.client().info("replication")["master_link_status"] == "up",
            5,
            "the replica to sync",
        )
        yield
        own.client().replicaof("NO", "ONE")
    finally:
        primary.close()


@contextlib.contextmanager
def loading(own: RedisServer) -> Iterator[None]:
    """A restart from a snapshot that takes seconds to load: LOADING meanwhile."""
    ballast = own.client()
    for start in range(0, 25_000, 5_000):
        ballast.mset({f"ballast:{n}": n for n in range(start, start + 5_000)})
    own.client().save()
    own.stop()
    own.start(
        "--key-load-delay",
        "100",  # microseconds per key: 25,000 keys take about 2.5 s
        "--loading-process-events-interval-bytes",
        "1024",  # answer clients (with LOADING) while loading
        wait=False,
    )
    yield
    wait_until(own.answers, 15, "redis to finish loading")


CONDITIONS = {
    "oom": out_of_memory,
    "busy": busy,
    "readonly": read_only,
    "loading": loading,
}


def refreshed_after(own: RedisServer, prefix: str, workers: set[str], since: float) -> bool:
    """Every worker in `workers` has written its heartbeat since `since` (monotonic)."""
    ttl = 3.0  # FAST_REDIS's heartbeat_ttl
    redis_client = own.client()
    for wid in workers:
        remaining = redis_client.pttl(f"{prefix}:alive:{wid}") / 1000
        if remaining < 0 or remaining < ttl - (time.monotonic() - since) + 0.05:
            return False
    return True


async def newcomer_turned_away(node: Shoal) -> None:
    """A handshake while Redis fails: refused with 503, or closed with 1013 when Redis
    failed while registering it."""
    try:
        async with connect(node.url("newcomer"), open_timeout=5 * SCALE) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5 * SCALE)
            assert ws.close_code == 1013
    except InvalidStatus as exc:
        assert exc.response.status_code == 503  # noqa: PT017 - either outcome is right


def every_worker_healthy(node: Shoal) -> Callable[[], bool]:
    """A predicate, true once every worker has answered /healthz with 200 since it was
    made: SO_REUSEPORT hands each request to one worker, and one worker's 200 says
    nothing of the others' Redis connections."""
    seen: set[str] = set()

    def check() -> bool:
        body = node.health(expect_ok=True)
        if body is not None:
            seen.add(body["worker"])
        return len(seen) == node.workers

    return check


def not_kept(node: Shoal) -> bool:
    """/healthz answers 503, its state not refreshed for half the heartbeat TTL (3 s)."""
    health = node.health() or {}
    return health.get("http_status") == 503 and health.get("state_age", 0) >= 1.5


async def names(reply: dict[str, Any]) -> list[str]:
    return [user["user_id"] for user in reply["users"]]


@pytest.fixture
def node_on_own_redis(
    tmp_path: Path, settings: dict[str, Any], own_redis: RedisServer
) -> Iterator[Shoal]:
    settings["redis"]["url"] = own_redis.url
    node = Shoal(tmp_path, settings).start()
    yield node
    node.stop()


@pytest.mark.parametrize("condition", sorted(CONDITIONS))
async def test_error_replies_lose_no_state(
    condition: str, node_on_own_redis: Shoal, own_redis: RedisServer, prefix: str
) -> None:
    """Redis answering errors for seconds costs the clients an error each, no state.

    Before: the first OOM reply killed the worker's heartbeat task without a log line;
    its own master then swept it as dead while it was serving, for good.
    """
    node = node_on_own_redis
    async with clients_on_workers(node, ["ann", "bo"]) as (ann, bo):
        await join("r", ann, bo)
        workers = {ann.worker, bo.worker}

        with CONDITIONS[condition](own_redis):
            # What needs Redis fails with a clear error; the connection stays.
            reply = await ann.request({"type": "join_room", "room": "other"}, "error")
            assert reply["message"] == "Service unavailable"
            echoed = await ann.request({"type": "still", "n": 1}, "echo")
            assert echoed["data"] == {"type": "still", "n": 1}
            await newcomer_turned_away(node)
            # Health says the state is not being kept: heartbeats failed for ttl / 2.
            wait_until(lambda: not_kept(node), _CONDITION_SECONDS, "/healthz to say so")
        cleared = time.monotonic()

        # Every worker beats again, so no sweep will take their state away.
        wait_until(
            lambda: refreshed_after(own_redis, prefix, workers, cleared),
            5,
            "both workers to refresh their heartbeat",
        )
        wait_until(lambda: node.health(expect_ok=True), 5, "/healthz to be ok")

        async def both_present() -> bool:
            reply = await bo.request({"type": "presence", "room": "r"}, "presence")
            return await names(reply) == ["ann", "bo"]

        await eventually(both_present, 5, "both users back in presence")
        # Nothing half-written stays: not the failed join, not the refused newcomer.
        redis_client = own_redis.client()

        def only_the_live_state() -> bool:
            return (
                len(list(redis_client.scan_iter(f"{prefix}:conn:*"))) == 2
                and set(redis_client.hkeys(f"{prefix}:users")) == {"ann", "bo"}
                and not redis_client.exists(f"{prefix}:room:other")
            )

        wait_until(only_the_live_state, 5, "Redis to hold exactly the live connections")
        await ann.request({"type": "private", "to": "bo", "message": "hi"}, "message_sent")
        assert (await bo.expect("private_message"))["message"] == "hi"
        await ann.send({"type": "room_message", "room": "r", "message": "after"})
        for c in (ann, bo):
            assert (await c.expect("room_message"))["message"] == "after"
    assert "Traceback" not in node.log()


async def test_a_worker_killed_during_an_outage_waits_for_redis(
    node_on_own_redis: Shoal, own_redis: RedisServer, prefix: str
) -> None:
    """Before: the replacement exited with the boot-failure status and the master shut
    the whole node down, closing the surviving worker's clients."""
    node = node_on_own_redis
    async with clients_on_workers(node, ["ann", "bo"]) as (ann, bo):
        await ann.request({"type": "join_room", "room": "r"}, "joined_room")
        own_redis.stop()
        victim = int(bo.connection_id.split(".")[2])
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: len(node.worker_pids()) == 2 and victim not in node.worker_pids(),
            3,
            "a replacement worker",
        )
        wait_until(lambda: "waiting for redis" in node.log(), 5, "the replacement to wait")
        assert node.process is not None and node.process.poll() is None
        # The survivor's client is still served for what needs no Redis.
        assert (await ann.request({"type": "ping"}, "echo"))["data"] == {"type": "ping"}

        own_redis.start()  # empty: the survivor writes its state back
        wait_until(every_worker_healthy(node), 15, "both workers serving")
        redis_client = own_redis.client()
        wait_until(lambda: redis_client.hvals(f"{prefix}:room:r") == ["ann"], 5, "ann written back")
        async with client(node.url("cy")) as cy:
            await cy.request({"type": "join_room", "room": "r"}, "joined_room")
            assert (await ann.expect("user_joined_room"))["user_id"] == "cy"
    log = node.log()
    assert "could not start" not in log and "stopping" not in log.split("SIGTERM")[0]


async def test_a_refused_subscription_fails_alone(
    tmp_path: Path, settings: dict[str, Any], own_redis: RedisServer, prefix: str
) -> None:
    """An ACL that denies one room's channel fails that join, and nothing else.

    Before: the NOPERM reply raised IndexError in the reply reader, the worker's whole
    subscriber connection was dropped and rebuilt, and every room lost messages.
    """
    own_redis.client().acl_setuser(
        "shoal",
        enabled=True,
        passwords=["+secret"],
        keys=["*"],
        commands=["+@all"],
        channels=[f"{prefix}:bus:all", f"{prefix}:bus:w:*", f"{prefix}:bus:room:open*"],
    )
    settings["redis"]["url"] = f"redis://shoal:secret@127.0.0.1:{own_redis.port}/0"
    node = Shoal(tmp_path, settings).start()
    try:
        async with clients_on_workers(node, ["ann", "bo"]) as (ann, bo):
            await join("open1", ann, bo)
            reply = await ann.request({"type": "join_room", "room": "secret"}, "error")
            assert reply["message"] == "Service unavailable"
            # The same worker's other room did not miss a message.
            for n in range(20):
                await bo.send({"type": "room_message", "room": "open1", "message": n})
            for c in (ann, bo):
                got = [(await c.expect("room_message"))["message"] for _ in range(20)]
                assert got == list(range(20))
            assert (await ann.request({"type": "join_room", "room": "open2"}, "joined_room"))[
                "members"
            ] == ["ann"]
        log = node.log()
        assert "refused SUBSCRIBE" in log and "NOPERM" in log
        assert "lost; reconnecting" not in log
        assert "Traceback" not in log and "password" not in log and "secret@" not in log
    finally:
        node.stop()


async def test_a_frozen_redis_delays_no_respawn_and_loses_no_departure(
    node_on_own_redis: Shoal, own_redis: RedisServer, record_property: Callable[[str, object], None]
) -> None:
    """Before: the master's own Redis calls hung its loop about 10 s each, so a killed
    worker came back after 8.3 s instead of at once."""
    node = node_on_own_redis
    async with clients_on_workers(node, ["ann", "bo"]) as (ann, bo):
        await join("r", ann, bo)
        own_redis.freeze()
        try:
            victim = int(bo.connection_id.split(".")[2])
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda: len(node.worker_pids()) == 2 and victim not in node.worker_pids(),
                1.5,
                "the worker to be respawned",
            )
            respawned = time.monotonic() - killed
            assert respawned < 1.5 * SCALE
            record_property("respawned_after_s", round(respawned, 2))
        finally:
            own_redis.thaw()
        # Redis back with its data: the housekeeper forgets the dead worker, and the room
        # it left is told.
        left = await ann.expect("user_left_room", timeout=10)
        assert (left["user_id"], left["total_members"]) == ("bo", 1)
        wait_until(lambda: node.health(expect_ok=True), 10, "both workers serving")


async def test_a_frozen_redis_does_not_delay_a_stop(
    tmp_path: Path,
    settings: dict[str, Any],
    own_redis: RedisServer,
    record_property: Callable[[str, object], None],
) -> None:
    """Before: a stop took 28 s with 2 workers (48 s with 4) against a 10 s budget."""
    settings["redis"]["url"] = own_redis.url
    settings["server"].update(shutdown_timeout=4, close_timeout=1)
    node = Shoal(tmp_path, settings).start()
    try:
        async with clients_on_workers(node, ["ann", "bo"]) as (ann, bo):
            await ann.request({"type": "join_room", "room": "r"}, "joined_room")
            own_redis.freeze()
            started = time.monotonic()
            node.signal(signal.SIGTERM)
            for c in (ann, bo):
                with contextlib.suppress(Exception):
                    await c.recv(timeout=3)
                assert c.ws.close_code == 1001
            assert time.monotonic() - started < 2 * SCALE
            record_property("clients_closed_after_s", round(time.monotonic() - started, 2))
            assert await asyncio.to_thread(node.wait, 4 + 2) == 0
            record_property("stopped_after_s", round(time.monotonic() - started, 2))
    finally:
        own_redis.thaw()
        node.stop()


@contextlib.contextmanager
def frozen(own: RedisServer, how: str) -> Iterator[None]:
    """Redis stops answering with its connections open: a stopped process, or CLIENT PAUSE
    (what an operator or a failover tool does)."""
    if how == "sigstop":
        own.freeze()
        try:
            yield
        finally:
            own.thaw()
        return
    admin = redis.Redis(port=own.port, socket_timeout=5)
    admin.execute_command("CLIENT", "PAUSE", 30_000, "ALL")  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        admin.close()


@pytest.mark.parametrize("how", ["sigstop", "client-pause"])
async def test_senders_are_told_when_redis_freezes(
    how: str,
    node_on_own_redis: Shoal,
    own_redis: RedisServer,
    record_property: Callable[[str, object], None],
) -> None:
    """A publish Redis does not answer within stall_timeout turns later ones away.

    Before: senders got no error at all, and what they sent arrived up to 15 s late.
    """
    node = node_on_own_redis
    async with clients_on_workers(node, ["ann", "bo"]) as (ann, bo):
        await join("r", ann, bo)
        accepted: list[int] = []
        with frozen(own_redis, how):
            started = time.monotonic()
            refused = None
            for n in range(400):
                await ann.send({"type": "room_message", "room": "r", "message": n})
                with contextlib.suppress(TimeoutError):
                    reply = await ann.recv(timeout=0.02)
                    if reply["type"] == "error":
                        refused = reply
                        break
                accepted.append(n)
            told_after = time.monotonic() - started
            assert refused == {"type": "error", "message": "Service unavailable"}
            # stall_timeout is 0.5 s here; the monitor looks every 0.25 s.
            assert told_after < 1.5 * SCALE
            wait_until(lambda: (node.health() or {}).get("http_status") == 503, 3, "503")
        thawed = time.monotonic()
        wait_until(lambda: node.health(expect_ok=True), 10, "/healthz to recover")
        recovered_after = time.monotonic() - thawed

        # What was accepted during the freeze arrives late, once, in order, or not at all.
        late = [m["message"] for m in await _drain(bo) if m["type"] == "room_message"]
        assert late == sorted(set(late)) and set(late) <= set(accepted)

        async def delivered() -> bool:
            await ann.send({"type": "room_message", "room": "r", "message": "after"})
            return any(m.get("message") == "after" for m in await _drain(bo))

        await eventually(delivered, 10, "room messages to flow again")
    record_property("sender_told_after_s", round(told_after, 2))
    record_property("accepted_during_freeze", len(accepted))
    record_property("delivered_late", len(late))
    record_property("healthy_after_thaw_s", round(recovered_after, 2))


async def test_departures_during_an_outage_are_announced(
    node_on_own_redis: Shoal, own_redis: RedisServer
) -> None:
    """Clients that close while Redis is down are announced once it is back, even empty.

    Before: 0 of 20 were announced; the other members kept ghosts.
    """
    node = node_on_own_redis
    leavers = [f"l{n}" for n in range(20)]
    async with client(node.url("watcher")) as watcher:
        await watcher.request({"type": "join_room", "room": "r"}, "joined_room")
        async with contextlib.AsyncExitStack() as stack:
            gone: list[Client] = []
            for user in leavers:
                c = await stack.enter_async_context(client(node.url(user)))
                await c.request({"type": "join_room", "room": "r"}, "joined_room")
                gone.append(c)
            joined = {m["user_id"] for m in await _drain(watcher)}
            assert joined == set(leavers)
            own_redis.stop()
            wait_until(lambda: (node.health() or {}).get("http_status") == 503, 10, "the outage")
        # All 20 closed during the outage.
        own_redis.start()  # empty
        told: set[str] = set()

        async def everyone_told() -> bool:
            with contextlib.suppress(TimeoutError):
                message = await watcher.recv(timeout=0.2)
                if message["type"] == "user_left_room":
                    told.add(message["user_id"])
            return told == set(leavers)

        await eventually(everyone_told, 15, "every departure to be announced")
        presence = await watcher.request({"type": "presence", "room": "r"}, "presence")
        assert await names(presence) == ["watcher"]


async def _drain(c: Client) -> list[dict[str, Any]]:
    """What `c` received in the next moment."""
    received = []
    with contextlib.suppress(TimeoutError):
        while True:
            received.append(await c.recv(timeout=0.2))
    return received


async def test_a_half_open_redis_connection_is_replaced(
    tmp_path: Path,
    settings: dict[str, Any],
    own_redis: RedisServer,
    record_property: Callable[[str, object], None],
) -> None:
    """A connection that silently stops carrying anything is noticed and replaced.

    Before: no keepalive and no health check on the subscriber: `up` stayed true while
    nothing arrived, for as long as the connection stayed half-open.
    """
    proxy = BlackholeProxy(own_redis.port)
    settings["redis"]["url"] = proxy.url
    node = Shoal(tmp_path, settings).start()
    try:
        async with clients_on_workers(node, ["ann", "bo"]) as (ann, bo):
            await join("r", ann, bo)
            opened = proxy.accepted
            assert proxy.blackhole() >= 6  # 3 per worker, and the housekeeper's
            cut = time.monotonic()
            # health_check_interval 1 + socket_timeout 1.5 here: replaced within ~3 s.
            wait_until(lambda: proxy.accepted >= opened + 6, 6, "new connections")

            async def delivered() -> bool:
                await ann.send({"type": "room_message", "room": "r", "message": "through"})
                while True:
                    try:
                        message = await bo.recv(timeout=0.3)
                    except TimeoutError:
                        return False
                    if message.get("message") == "through":
                        return True

            await eventually(delivered, 6, "room messages to flow again")
            recovered = time.monotonic() - cut
            assert recovered < 6 * SCALE
            record_property("flowing_again_after_s", round(recovered, 2))
    finally:
        node.stop()
        proxy.close()
    assert "no answer to a health check" in node.log() or "no reply from redis" in node.log()
