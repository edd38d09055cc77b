"""Shared state in Redis hashes: connections, users, rooms, channels and workers.

Every write names one key, so the layout works on Redis Cluster (see `shoal.workers.keys`).
Removing a connection starts by deleting its hash: only the caller that actually deleted
it goes on to unlink it from rooms, the user index and the user count, so a worker closing
a connection and a node sweeping a dead worker never remove it twice.

Redis errors become `ServiceUnavailable` here, in one place.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

import orjson
import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis

from shoal.server.errors import ServiceUnavailable
from shoal.workers.keys import CHANNEL_FIELD, ROOM_FIELD, Keys, TopicKind

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

# One key each, so both stay atomic on Redis Cluster. Sent with EVAL, not EVALSHA via
# redis-py's Script: in a pipeline, Script first asks SCRIPT EXISTS, a second round trip
# that cost 19% of a worker's CPU in a connect storm.
_INCR_USER = "redis.call('HINCRBY', KEYS[1], ARGV[1], 1) return redis.call('HLEN', KEYS[1])"
_DECR_USER = (
    "local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1) "
    "if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end return n"
)
_BATCH = 256


def connect(url: str) -> Redis:
    """A redis-py client for state operations (not the hot pub/sub path, see `bus`).

    The pool blocks when all its connections are busy: a storm of handshakes waits its
    turn instead of failing with "Too many connections".
    """
    pool = BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        max_connections=64,
        timeout=5.0,
    )
    return Redis(connection_pool=pool)


def translated(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
    """Turn Redis connection failures into `ServiceUnavailable`."""

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise ServiceUnavailable() from exc

    return wrapper


@dataclass(slots=True)
class Snapshot:
    """What a worker knows of one local connection, to write it back after Redis lost it."""

    cid: str
    user: str
    addr: str
    at: int
    meta: dict[str, Any] | None
    rooms: Iterable[str] = ()
    channels: Iterable[str] = ()


@dataclass(slots=True)
class _Presence:
    rooms: set[str] = field(default_factory=set)
    metadata: dict[str, Any] = field(default_factory=dict)


class Registry:
    """State operations of one worker (or, with no worker id, of a node's master)."""

    def __init__(self, client: Redis, keys: Keys, node_id: str, worker_id: str = "") -> None:
        self.redis = client
        self.keys = keys
        self.node_id = node_id
        self.worker_id = worker_id

    @translated
    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    @translated
    async def add_connection(self, snapshot: Snapshot) -> int:
        """Record a new connection. Returns the number of distinct users now connected."""
        pipe = self.redis.pipeline(transaction=False)
        self._write_connection(pipe, snapshot)
        results = await pipe.execute()
        return int(results[-1])

    def _write_connection(self, pipe: Any, snapshot: Snapshot) -> None:
        """Queue the writes that record `snapshot` on `pipe`; the user count comes last."""
        keys = self.keys
        cid = snapshot.cid
        fields: dict[str, str | int] = {
            "worker": self.worker_id,
            "node": self.node_id,
            "user": snapshot.user,
            "addr": snapshot.addr,
            "at": snapshot.at,
        }
        if snapshot.meta:
            fields["meta"] = orjson.dumps(snapshot.meta).decode()
        for room in snapshot.rooms:
            fields[ROOM_FIELD + room] = 1
            pipe.hset(keys.topic(TopicKind.ROOM, room), cid, snapshot.user)
        for channel in snapshot.channels:
            fields[CHANNEL_FIELD + channel] = 1
            pipe.hset(keys.topic(TopicKind.CHANNEL, channel), cid, snapshot.user)
        pipe.hset(keys.conn(cid), mapping=fields)
        pipe.hset(keys.user(snapshot.user), cid, self.worker_id)
        pipe.hset(keys.worker_conns(self.worker_id), cid, snapshot.user)
        pipe.eval(_INCR_USER, 1, keys.users, snapshot.user)

    @translated
    async def remove_connection(self, cid: str) -> bool:
        """Remove a connection and every trace of it. False if it was already gone."""
        return await remove_connection(self.redis, self.keys, cid)

    @translated
    async def join(self, kind: TopicKind, name: str, cid: str, user: str) -> list[str]:
        """Add a connection to a room or channel. Returns the members' user ids."""
        key = self.keys.topic(kind, name)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, cid, user)
        pipe.hset(self.keys.conn(cid), kind.field_prefix + name, 1)
        pipe.hvals(key)
        results = await pipe.execute()
        return list(results[-1])

    @translated
    async def leave(self, kind: TopicKind, name: str, cid: str) -> list[str]:
        """Remove a connection from a room or channel. Returns the remaining user ids.

        Redis deletes a hash when its last field goes, so an empty room disappears.
        """
        key = self.keys.topic(kind, name)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(key, cid)
        pipe.hdel(self.keys.conn(cid), kind.field_prefix + name)
        pipe.hvals(key)
        results = await pipe.execute()
        return list(results[-1])

    @translated
    async def set_metadata(self, cid: str, metadata: dict[str, Any]) -> None:
        await self.redis.hset(self.keys.conn(cid), "meta", orjson.dumps(metadata).decode())

    @translated
    async def user_connections(self, user: str) -> dict[str, str]:
        """Connection id -> worker id for every connection of `user`."""
        return cast(dict[str, str], await self.redis.hgetall(self.keys.user(user)))

    @translated
    async def total_users(self) -> int:
        return int(await self.redis.hlen(self.keys.users))

    @translated
    async def presence(self, room: str | None = None) -> list[dict[str, Any]]:
        """Who is connected, across workers and nodes: the whole server, or one room.

        Returns `[{"user_id", "rooms", "metadata"}]` sorted by user id; `rooms` are the
        rooms (not channels) the user's connections are in, `metadata` their merged
        metadata.
        """
        if room is not None:
            cids = cast(list[str], await self.redis.hkeys(self.keys.topic(TopicKind.ROOM, room)))
        else:
            workers = cast(list[str], await self.redis.hkeys(self.keys.workers))
            pipe = self.redis.pipeline(transaction=False)
            for wid in workers:
                pipe.hkeys(self.keys.worker_conns(wid))
            cids = [cid for batch in await pipe.execute() for cid in batch]
        users: dict[str, _Presence] = {}
        for start in range(0, len(cids), _BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for cid in cids[start : start + _BATCH]:
                pipe.hgetall(self.keys.conn(cid))
            for record in await pipe.execute():
                if "user" not in record:
                    continue  # removed since we listed it
                entry = users.setdefault(record["user"], _Presence())
                entry.rooms.update(k[len(ROOM_FIELD) :] for k in record if k.startswith(ROOM_FIELD))
                if "meta" in record:
                    entry.metadata.update(orjson.loads(record["meta"]))
        return [
            {"user_id": user, "rooms": sorted(entry.rooms), "metadata": entry.metadata}
            for user, entry in sorted(users.items())
        ]

    @translated
    async def heartbeat(self, ttl: float) -> bool:
        """Refresh this worker's heartbeat. False when it had expired or Redis lost it.

        After False, the caller must `resync()`: a sweeper may have removed, or Redis
        may have lost, this worker's state.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.alive(self.worker_id), self.node_id, px=int(ttl * 1000), get=True)
        pipe.hset(self.keys.workers, self.worker_id, self.node_id)
        previous, _ = await pipe.execute()
        return previous is not None

    @translated
    async def resync(self, snapshots: Sequence[Snapshot]) -> None:
        """Write this worker's whole state again, after Redis lost it or a sweep removed it."""
        await forget_worker(self.redis, self.keys, self.worker_id, deregister=False)
        for start in range(0, len(snapshots), _BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for snapshot in snapshots[start : start + _BATCH]:
                self._write_connection(pipe, snapshot)
            await pipe.execute()

    @translated
    async def forget_worker(self, wid: str) -> int:
        """Remove a worker that is gone and all its connections. Returns how many."""
        return await forget_worker(self.redis, self.keys, wid)

    @translated
    async def sweep(self) -> list[str]:
        """Remove the state of every worker whose heartbeat expired, on any node.

        Returns the ids of the workers swept by this call.
        """
        workers = cast(list[str], await self.redis.hkeys(self.keys.workers))
        if not workers:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for wid in workers:
            pipe.exists(self.keys.alive(wid))
        alive = await pipe.execute()
        swept = []
        for wid, is_alive in zip(workers, alive, strict=True):
            # HDEL is the claim: of several nodes sweeping at once, one cleans each worker.
            if not is_alive and await self.redis.hdel(self.keys.workers, wid):
                await forget_worker(self.redis, self.keys, wid, deregister=False)
                swept.append(wid)
        return swept


async def remove_connection(client: Redis, keys: Keys, cid: str) -> bool:
    key = keys.conn(cid)
    async with client.pipeline(transaction=True) as claim:
        claim.hgetall(key)
        claim.delete(key)
        record, deleted = await claim.execute()
    if not deleted or "user" not in record:
        return False
    user = record["user"]
    pipe = client.pipeline(transaction=False)
    for name in record:
        if name.startswith(ROOM_FIELD):
            pipe.hdel(keys.topic(TopicKind.ROOM, name[len(ROOM_FIELD) :]), cid)
        elif name.startswith(CHANNEL_FIELD):
            pipe.hdel(keys.topic(TopicKind.CHANNEL, name[len(CHANNEL_FIELD) :]), cid)
    pipe.hdel(keys.user(user), cid)
    pipe.hdel(keys.worker_conns(record.get("worker", "")), cid)
    pipe.eval(_DECR_USER, 1, keys.users, user)
    await pipe.execute()
    return True


async def forget_worker(client: Redis, keys: Keys, wid: str, *, deregister: bool = True) -> int:
    """Remove every connection `wid` held, then (with `deregister`) the worker itself."""
    cids = cast(list[str], await client.hkeys(keys.worker_conns(wid)))
    removed = 0
    for start in range(0, len(cids), _BATCH):
        batch = cids[start : start + _BATCH]
        results = await asyncio.gather(*(remove_connection(client, keys, cid) for cid in batch))
        removed += sum(results)
    await client.delete(keys.worker_conns(wid))
    if deregister:
        pipe = client.pipeline(transaction=False)
        pipe.hdel(keys.workers, wid)
        pipe.delete(keys.alive(wid))
        await pipe.execute()
    if removed:
        logger.info("removed %d connections of worker %s from redis", removed, wid)
    return removed
