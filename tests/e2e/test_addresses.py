"""Limits per client address (`limits.connections_per_ip`,
`limits.connections_per_ip_per_minute`) and `server.trusted_proxies`, against live
two-worker servers with plain `websockets` clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

from support import FAST_REDIS, SCALE, RedisServer, Shoal, eventually, scrape, wait_until

LOCAL = "127.0.0.1"


def settings_for(
    redis_server: RedisServer, server: dict[str, Any] | None = None, **limits: Any
) -> dict[str, Any]:
    return {
        "server": {"worker_num": 2, **(server or {})},
        "redis": {"url": redis_server.url, "prefix": f"t{uuid.uuid4().hex[:10]}", **FAST_REDIS},
        "log": {"level": "info"},
        "tasks": {"task_worker_num": 0},
        "limits": limits,
    }


def slots(node: Shoal, redis_server: RedisServer, ip: str = LOCAL) -> dict[str, str]:
    """The address's slots in Redis: connection id -> worker id."""
    key = f"{node.settings['redis']['prefix']}:addr:{{{ip}}}"
    held: Any = redis_server.client().hgetall(key)  # str keys and values: decoded
    return dict(held)


def url(node: Shoal) -> str:
    return f"ws://{LOCAL}:{node.port}/ws"


async def refused(node: Shoal, **kwargs: Any) -> tuple[int, dict[str, Any], Headers]:
    """The status, JSON body and headers of a refused handshake."""
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url(node), **kwargs):
            pass
    response = caught.value.response
    return response.status_code, json.loads(response.body), response.headers


async def welcomed(node: Shoal, **kwargs: Any) -> ClientConnection:
    ws = await connect(url(node), close_timeout=2, **kwargs)
    assert json.loads(await ws.recv())["type"] == "welcome"
    return ws


@contextlib.asynccontextmanager
async def clients(node: Shoal, n: int, **kwargs: Any) -> AsyncIterator[list[ClientConnection]]:
    opened = [await welcomed(node, **kwargs) for _ in range(n)]
    try:
        yield opened
    finally:
        await asyncio.gather(*(ws.close() for ws in opened))


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Shoal]:
    settings = settings_for(redis_server, connections_per_ip=10)
    shoal = Shoal(tmp_path_factory.mktemp("capped"), settings).start()
    yield shoal
    shoal.stop()


async def test_the_cap_holds_across_workers_and_a_closed_connection_gives_its_slot_back(
    capped: Shoal, redis_server: RedisServer
) -> None:
    async with clients(capped, 10) as held:
        # Both workers hold some: the count is the address's, not a worker's.
        owners = set(slots(capped, redis_server).values())
        assert len(owners) == 2, owners
        status, body, headers = await refused(capped)
        assert status == 429
        assert body == {"error": "too many requests", "reason": "connections_per_ip", "limit": 10}
        assert headers["Retry-After"] == "5"
        await held[0].close()
        await eventually(lambda: _admitted(capped), 5, "a place once one closed")
    await asyncio.to_thread(
        wait_until, lambda: not slots(capped, redis_server), 5, "every slot back"
    )
    # Each process copies its counts to shared memory once a second.
    key = ("shoal_handshakes_refused_total", "connections_per_ip")
    await asyncio.to_thread(wait_until, lambda: scrape(capped)[key] >= 1, 3, "the refusal counted")


async def _admitted(node: Shoal) -> bool:
    try:
        ws = await welcomed(node)
    except InvalidStatus:
        return False
    await ws.close()
    return True


async def test_parallel_handshakes_never_exceed_the_cap(
    capped: Shoal, redis_server: RedisServer, record_property: Callable[[str, object], None]
) -> None:
    """40 handshakes at once, over both workers, with a cap of 10: the check and the
    reservation are one Redis script, so the bound is exact."""

    async def attempt() -> ClientConnection | int:
        try:
            return await welcomed(capped)
        except InvalidStatus as exc:
            return exc.response.status_code

    results = await asyncio.gather(*(attempt() for _ in range(40)))
    admitted = [r for r in results if isinstance(r, ClientConnection)]
    statuses = [r for r in results if isinstance(r, int)]
    record_property("admitted_of_40", len(admitted))
    try:
        assert len(admitted) == 10
        assert statuses == [429] * 30
        assert len(slots(capped, redis_server)) == 10
    finally:
        await asyncio.gather(*(ws.close() for ws in admitted))
    await asyncio.to_thread(
        wait_until, lambda: not slots(capped, redis_server), 5, "every slot back"
    )


async def test_a_client_cannot_evade_the_cap_with_its_own_forwarded_header(
    capped: Shoal, redis_server: RedisServer
) -> None:
    """Without `server.trusted_proxies`, X-Forwarded-For is ignored."""
    spoofed = [await welcomed(capped, additional_headers={"X-Forwarded-For": f"198.51.100.{n}"})
               for n in range(10)]  # fmt: skip
    try:
        status, body, _ = await refused(capped, additional_headers={"X-Forwarded-For": "9.9.9.9"})
        assert (status, body["reason"]) == (429, "connections_per_ip")
        assert len(slots(capped, redis_server)) == 10
        assert not slots(capped, redis_server, "198.51.100.1")
    finally:
        await asyncio.gather(*(ws.close() for ws in spoofed))
    log = capped.log()
    assert re.search(r"connection opened: .* address=127\.0\.0\.1:\d+", log)
    assert "198.51.100" not in log


async def test_a_killed_worker_gives_its_slots_back(
    tmp_path: Path, redis_server: RedisServer, record_property: Callable[[str, object], None]
) -> None:
    """SIGKILL leaves the worker's slots in Redis; the sweep of its state returns them."""
    node = Shoal(tmp_path, settings_for(redis_server, connections_per_ip=10)).start()
    try:
        async with clients(node, 8) as held:
            owners = slots(node, redis_server)
            victim = next(iter(owners.values()))
            mine = sum(1 for wid in owners.values() if wid == victim)
            pid = int(victim.rsplit(".", 1)[1])
            started = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(
                wait_until,
                lambda: len(slots(node, redis_server)) == 8 - mine,
                15,
                "the killed worker's slots to come back",
            )
            record_property("slots_back_after_s", round(time.monotonic() - started, 2))
            assert victim not in slots(node, redis_server).values()
            # Its places are free again: up to the cap, and no further.
            await asyncio.to_thread(wait_until, lambda: node.health(expect_ok=True), 15, "respawn")
            extra = [await welcomed(node) for _ in range(mine + 2)]
            status, _, _ = await refused(node)
            assert status == 429
            await asyncio.gather(*(ws.close() for ws in extra))
            del held
    finally:
        node.stop()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Shoal]:
    server = {"trusted_proxies": [LOCAL, "10.0.0.0/8"]}
    settings = settings_for(redis_server, server, connections_per_ip=2)
    shoal = Shoal(tmp_path_factory.mktemp("proxied"), settings).start()
    yield shoal
    shoal.stop()


async def test_behind_a_trusted_proxy_each_forwarded_client_is_counted_apart(
    proxied: Shoal, redis_server: RedisServer
) -> None:
    # The right-most address not itself trusted: 10.1.2.3 is another proxy of ours, and
    # what the client wrote to the left of its real address is ignored.
    first = {"X-Forwarded-For": "1.1.1.1, 203.0.113.7, 10.1.2.3"}
    second = {"X-Forwarded-For": "203.0.113.8"}
    async with clients(proxied, 2, additional_headers=first):
        status, body, _ = await refused(proxied, additional_headers=first)
        assert (status, body["reason"]) == (429, "connections_per_ip")
        assert len(slots(proxied, redis_server, "203.0.113.7")) == 2
        async with clients(proxied, 2, additional_headers=second):
            assert len(slots(proxied, redis_server, "203.0.113.8")) == 2
        assert not slots(proxied, redis_server, LOCAL)
    log = proxied.log()
    assert re.search(r"connection opened: .* address=203\.0\.113\.7\n", log)
    assert "1.1.1.1" not in log


@pytest.fixture(scope="module")
def paced(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Shoal]:
    settings = settings_for(redis_server, connections_per_ip_per_minute=6)
    shoal = Shoal(tmp_path_factory.mktemp("paced"), settings).start()
    yield shoal
    shoal.stop()


async def test_new_connections_per_minute(paced: Shoal) -> None:
    """6 a minute: 6 at once, then one every 10 s; `Retry-After` says when."""
    for _ in range(6):
        ws = await welcomed(paced)
        await ws.close()
    status, body, headers = await refused(paced)
    assert body == {
        "error": "too many requests",
        "reason": "connections_per_ip_per_minute",
        "limit": 6,
    }
    assert status == 429
    assert 1 <= int(headers["Retry-After"]) <= 10
    key = ("shoal_handshakes_refused_total", "connections_per_ip_per_minute")
    await asyncio.to_thread(wait_until, lambda: scrape(paced)[key] == 1, 3, "the refusal counted")


async def test_slots_given_back_while_redis_refuses_writes_come_back_after(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """Connections that close while Redis holds every write back cannot give their slots
    back then: the worker retries once Redis answers, so the address's count does not
    leak. (CLIENT PAUSE WRITE: a write waits, the worker gives up on it and drops the
    connection, and Redis discards what it held; keys do not expire meanwhile, so no
    sweep steps in.)"""
    node = Shoal(tmp_path, settings_for(own_redis, connections_per_ip=10)).start()
    redis = own_redis.client()
    try:
        async with clients(node, 4) as held:
            assert len(slots(node, own_redis)) == 4
            redis.execute_command("CLIENT", "PAUSE", int(20_000 * SCALE), "WRITE")  # type: ignore[no-untyped-call]
            try:
                await asyncio.gather(*(ws.close() for ws in held))
                lost = ("shoal_redis_errors_total", "lost")
                await asyncio.to_thread(
                    wait_until, lambda: scrape(node).get(lost, 0) >= 2, 10, "redis to be lost"
                )
                assert len(slots(node, own_redis)) == 4
            finally:
                redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
            await asyncio.to_thread(
                wait_until, lambda: not slots(node, own_redis), 10, "the slots back"
            )
    finally:
        node.stop()
