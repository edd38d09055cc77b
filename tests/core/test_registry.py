"""Shared state in Redis hashes: claims, sweeps and write-backs, against a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shoal.core.keys import Keys, TopicKind
from shoal.core.registry import Departure, Registry, Snapshot, connect

from support import RedisServer


@pytest.fixture
async def registries(
    redis_server: RedisServer, prefix: str
) -> AsyncIterator[tuple[Registry, Registry]]:
    client = connect(redis_server.url)
    keys = Keys(prefix)
    yield Registry(client, keys, "n1", "n1.0.1"), Registry(client, keys, "n2", "n2.0.2")
    await client.close()


async def add(registry: Registry, record: Snapshot) -> int:
    """Record a connection as a worker does; return the distinct users connected then."""
    await registry.submit_connection(record)
    return await registry.total_users()


def snapshot(cid: str, user: str, rooms: tuple[str, ...] = ()) -> Snapshot:
    return Snapshot(cid=cid, user=user, addr="127.0.0.1:1", at=1, meta={"k": 1}, rooms=rooms)


async def test_connections_users_and_rooms(registries: tuple[Registry, Registry]) -> None:
    """Connections, distinct users, room members and presence across two workers."""
    one, two = registries
    assert await add(one, snapshot("c1", "ann")) == 1
    assert await add(two, snapshot("c2", "ann")) == 1  # same user, still one user
    assert await add(two, snapshot("c3", "bo")) == 2
    assert await one.user_connections("ann") == {"c1": "n1.0.1", "c2": "n2.0.2"}
    assert await one.join(TopicKind.ROOM, "r", "c1", "ann") == ["ann"]
    assert sorted(await two.join(TopicKind.ROOM, "r", "c3", "bo")) == ["ann", "bo"]
    presence = await one.presence("r")
    assert presence == [
        {"user_id": "ann", "rooms": ["r"], "metadata": {"k": 1}},
        {"user_id": "bo", "rooms": ["r"], "metadata": {"k": 1}},
    ]
    remaining = await two.leave(TopicKind.ROOM, "r", "c3", "bo")
    assert remaining == ["ann"] and remaining.total == 1

    assert await one.remove_connection("c1") == Departure("ann", ("r",))
    assert await one.remove_connection("c1") is None  # the claim: removed once only
    assert await one.total_users() == 2  # ann still has c2
    assert await one.presence("r") == []
    assert await two.remove_connection("c2") is not None
    assert await one.total_users() == 1


async def test_sweep_removes_only_workers_whose_heartbeat_expired(
    registries: tuple[Registry, Registry], redis_server: RedisServer, prefix: str
) -> None:
    """A sweep removes the state of workers whose heartbeat key expired, once, and only theirs."""
    live, dead = registries
    assert await live.heartbeat(10) is False  # first beat: nothing was there
    assert await live.heartbeat(10) is True
    await dead.heartbeat(10)
    await add(live, snapshot("c1", "ann", rooms=("r",)))
    await live.join(TopicKind.ROOM, "r", "c1", "ann")
    await add(dead, snapshot("c2", "bo", rooms=("r",)))
    await dead.join(TopicKind.ROOM, "r", "c2", "bo")
    redis = redis_server.client()
    redis.delete(f"{prefix}:alive:n2.0.2")  # as if its TTL ran out

    assert await live.sweep() == {"n2.0.2": [Departure("bo", ("r",))]}
    assert await live.sweep() == {}
    assert redis.hgetall(f"{prefix}:room:r") == {"c1": "ann"}
    assert redis.hkeys(f"{prefix}:users") == ["ann"]
    assert redis.hkeys(f"{prefix}:workers") == ["n1.0.1"]
    assert not redis.exists(f"{prefix}:user:bo", f"{prefix}:wconns:n2.0.2", f"{prefix}:conn:c2")


async def test_resync_writes_back_what_redis_lost(
    registries: tuple[Registry, Registry], redis_server: RedisServer, prefix: str
) -> None:
    """After Redis lost everything, resync writes the worker's state back, idempotently."""
    one, _ = registries
    await one.heartbeat(10)
    state = [snapshot("c1", "ann", rooms=("r",)), snapshot("c2", "ann")]
    for s in state:
        await add(one, s)
    await one.join(TopicKind.ROOM, "r", "c1", "ann")
    redis = redis_server.client()
    for key in redis.keys(f"{prefix}:*"):
        redis.delete(key)  # Redis restarted empty
    assert await one.heartbeat(10) is False
    await one.resync(state)
    assert await one.heartbeat(10) is True
    assert await one.presence() == [{"user_id": "ann", "rooms": ["r"], "metadata": {"k": 1}}]
    assert redis.hgetall(f"{prefix}:users") == {"ann": "2"}
    # Written back twice (a sweep raced it): counts stay right.
    await one.resync(state)
    assert redis.hgetall(f"{prefix}:users") == {"ann": "2"}
    assert redis.hgetall(f"{prefix}:{TopicKind.ROOM.value}:r") == {"c1": "ann"}
    assert redis.hgetall(f"{prefix}:roomusers:r") == {"ann": "1"}


async def test_big_rooms_list_a_sample_and_count_distinct_users(
    registries: tuple[Registry, Registry], redis_server: RedisServer, prefix: str
) -> None:
    """A join returns at most `limit` distinct users and the room's size, in one round
    trip, however big the room; two connections of one user count once."""
    one, two = registries
    for n in range(30):
        await add(one, snapshot(f"c{n}", f"u{n % 25}"))  # 25 users, 30 connections
    members = None
    for n in range(30):
        members = await one.join(TopicKind.ROOM, "big", f"c{n}", f"u{n % 25}", limit=10)
    assert members is not None and members.total == 25 and len(set(members)) == 10
    everyone = await two.members(TopicKind.ROOM, "big")
    assert sorted(everyone) == sorted(f"u{n}" for n in range(25)) and everyone.total == 25
    assert (await two.members(TopicKind.ROOM, "big", limit=0)) == []
    # u0 has two connections in the room: leaving with one keeps the user counted.
    assert (await one.leave(TopicKind.ROOM, "big", "c0", "u0", limit=0)).total == 25
    assert (await one.leave(TopicKind.ROOM, "big", "c25", "u0", limit=0)).total == 24
    # A removed connection (u5's only one) takes its user out of the count.
    assert await one.remove_connection("c5") is not None
    assert (await two.members(TopicKind.ROOM, "big", limit=0)).total == 23


async def test_reconciling_a_membership_twice_counts_it_once(
    registries: tuple[Registry, Registry], redis_server: RedisServer, prefix: str
) -> None:
    """What a failed join or leave left half-written is set right without counting twice."""
    one, _ = registries
    await add(one, snapshot("c1", "ann"))
    for _ in range(2):
        await one.reconcile(TopicKind.ROOM, "r", "c1", "ann", member=True)
    redis = redis_server.client()
    assert redis.hgetall(f"{prefix}:roomusers:r") == {"ann": "1"}
    assert redis.hget(f"{prefix}:conn:c1", "r:r") == "1"
    for _ in range(2):
        await one.reconcile(TopicKind.ROOM, "r", "c1", "ann", member=False)
    assert not redis.exists(f"{prefix}:roomusers:r", f"{prefix}:room:r")
    assert redis.hget(f"{prefix}:conn:c1", "r:r") is None
