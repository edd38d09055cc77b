"""Shared state in Redis hashes: connections, users, rooms, channels and workers.

Every command names one key, so the layout works on Redis Cluster (see `shoal.core.keys`).
Removing a connection starts by deleting its hash: only the caller that actually deleted
it goes on to unlink it from rooms, the user index and the user count, so a worker closing
a connection and a node sweeping a dead worker never remove it twice.

Commands go through `shoal.core.resp.Client`, which raises a `ServiceUnavailable`
subclass when Redis cannot be reached or refuses a command.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from shoal.core.keys import CHANNEL_FIELD, ROOM_FIELD, Keys, TopicKind
from shoal.core.resp import Client, RedisAddress, Timeouts
from shoal.core.schema import PresenceEntry

logger = logging.getLogger(__name__)

# One key each, so both stay atomic on Redis Cluster. EVAL rather than EVALSHA: Redis
# caches the compiled script, and no NOSCRIPT can follow a Redis restart.
_INCR_USER = "redis.call('HINCRBY', KEYS[1], ARGV[1], 1) return redis.call('HLEN', KEYS[1])"
_DECR_USER = (
    "local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1) "
    "if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end return n"
)
_BATCH = 256

Command = tuple[Any, ...]


def connect(url: str, timeouts: Timeouts | None = None) -> Client:
    """A client for state operations on the Redis at `url`."""
    return Client(RedisAddress.from_url(url), timeouts)


def _pairs(flat: list[str]) -> dict[str, str]:
    """HGETALL's RESP2 reply, [field, value, field, value, ...], as a dict."""
    it = iter(flat)
    return dict(zip(it, it, strict=True))


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


@dataclass(frozen=True, slots=True)
class Departure:
    """A connection a cleanup removed: whose it was and which rooms it was in."""

    user: str
    rooms: tuple[str, ...]


@dataclass(slots=True)
class _Presence:
    rooms: set[str] = field(default_factory=set)
    metadata: dict[str, Any] = field(default_factory=dict)


class Registry:
    """State operations of one worker (or, with no worker id, of a node's master)."""

    def __init__(self, client: Client, keys: Keys, node_id: str, worker_id: str = "") -> None:
        self.redis = client
        self.keys = keys
        self.node_id = node_id
        self.worker_id = worker_id

    async def ping(self) -> bool:
        return bool(await self.redis.execute("PING") == "PONG")

    async def add_connection(self, snapshot: Snapshot) -> int:
        """Record a new connection. Returns the number of distinct users now connected."""
        results = await self.redis.pipeline(self._write_connection(snapshot))
        return int(results[-1])

    def _write_connection(self, snapshot: Snapshot) -> list[Command]:
        """The commands that record `snapshot`; the user count comes last."""
        keys = self.keys
        cid = snapshot.cid
        fields: list[Any] = [
            "worker", self.worker_id, "node", self.node_id, "user", snapshot.user,
            "addr", snapshot.addr, "at", snapshot.at,
        ]  # fmt: skip
        # The connection's own hash goes first: whatever else a failure leaves behind,
        # `remove_connection` finds it through that hash (see Worker._forget).
        if snapshot.meta:
            fields += ["meta", orjson.dumps(snapshot.meta)]
        for room in snapshot.rooms:
            fields += [ROOM_FIELD + room, 1]
        for channel in snapshot.channels:
            fields += [CHANNEL_FIELD + channel, 1]
        commands: list[Command] = [("HSET", keys.conn(cid), *fields)]
        for room in snapshot.rooms:
            commands.append(("HSET", keys.topic(TopicKind.ROOM, room), cid, snapshot.user))
        for channel in snapshot.channels:
            commands.append(("HSET", keys.topic(TopicKind.CHANNEL, channel), cid, snapshot.user))
        commands += [
            ("HSET", keys.user(snapshot.user), cid, self.worker_id),
            ("HSET", keys.worker_conns(self.worker_id), cid, snapshot.user),
            ("EVAL", _INCR_USER, 1, keys.users, snapshot.user),
        ]
        return commands

    async def remove_connection(self, cid: str) -> bool:
        """Remove a connection and every trace of it. False if it was already gone."""
        return await remove_connection(self.redis, self.keys, cid) is not None

    async def unjoin(self, kind: TopicKind, name: str, cid: str) -> None:
        """Undo what a failed `join` or `leave` may have written half-way: `cid` is not
        a member of `name`, whatever Redis held."""
        await self.redis.pipeline(
            [
                ("HDEL", self.keys.topic(kind, name), cid),
                ("HDEL", self.keys.conn(cid), kind.field_prefix + name),
            ]
        )

    async def join(self, kind: TopicKind, name: str, cid: str, user: str) -> list[str]:
        """Add a connection to a room or channel. Returns the members' user ids."""
        key = self.keys.topic(kind, name)
        results = await self.redis.pipeline(
            [
                ("HSET", key, cid, user),
                ("HSET", self.keys.conn(cid), kind.field_prefix + name, 1),
                ("HVALS", key),
            ]
        )
        return list(results[-1])

    async def leave(self, kind: TopicKind, name: str, cid: str) -> list[str]:
        """Remove a connection from a room or channel. Returns the remaining user ids.

        Redis deletes a hash when its last field goes, so an empty room disappears.
        """
        key = self.keys.topic(kind, name)
        results = await self.redis.pipeline(
            [
                ("HDEL", key, cid),
                ("HDEL", self.keys.conn(cid), kind.field_prefix + name),
                ("HVALS", key),
            ]
        )
        return list(results[-1])

    async def members(self, kind: TopicKind, name: str) -> list[str]:
        """The user ids of a room's or channel's members, each once."""
        return list(dict.fromkeys(await self.redis.execute("HVALS", self.keys.topic(kind, name))))

    async def set_metadata(self, cid: str, metadata: dict[str, Any]) -> None:
        await self.redis.execute("HSET", self.keys.conn(cid), "meta", orjson.dumps(metadata))

    async def user_connections(self, user: str) -> dict[str, str]:
        """Connection id -> worker id for every connection of `user`."""
        return _pairs(await self.redis.execute("HGETALL", self.keys.user(user)))

    async def total_users(self) -> int:
        return int(await self.redis.execute("HLEN", self.keys.users))

    async def presence(self, room: str | None = None) -> list[PresenceEntry]:
        """Who is connected, across workers and nodes: the whole server, or one room.

        Returns `[{"user_id", "rooms", "metadata"}]` sorted by user id; `rooms` are the
        rooms (not channels) the user's connections are in, `metadata` their merged
        metadata.
        """
        redis = self.redis
        if room is not None:
            cids: list[str] = await redis.execute("HKEYS", self.keys.topic(TopicKind.ROOM, room))
        else:
            workers = await redis.execute("HKEYS", self.keys.workers)
            batches = await redis.pipeline([("HKEYS", self.keys.worker_conns(w)) for w in workers])
            cids = [cid for batch in batches for cid in batch]
        users: dict[str, _Presence] = {}
        for start in range(0, len(cids), _BATCH):
            batch = cids[start : start + _BATCH]
            for flat in await redis.pipeline([("HGETALL", self.keys.conn(c)) for c in batch]):
                record = _pairs(flat)
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

    async def heartbeat(self, ttl: float) -> bool:
        """Refresh this worker's heartbeat. False when it had expired or Redis lost it.

        After False, the caller must `resync()`: a sweeper may have removed, or Redis
        may have lost, this worker's state.
        """
        previous, _ = await self.redis.pipeline(
            [
                (
                    "SET",
                    self.keys.alive(self.worker_id),
                    self.node_id,
                    "PX",
                    int(ttl * 1000),
                    "GET",
                ),
                ("HSET", self.keys.workers, self.worker_id, self.node_id),
            ]
        )
        return previous is not None

    async def resync(self, snapshots: Sequence[Snapshot]) -> None:
        """Write this worker's whole state again, after Redis lost it or a sweep removed it."""
        await forget_worker(self.redis, self.keys, self.worker_id, deregister=False)
        for start in range(0, len(snapshots), _BATCH):
            commands = [
                c for s in snapshots[start : start + _BATCH] for c in self._write_connection(s)
            ]
            await self.redis.pipeline(commands)

    async def forget_worker(self, wid: str) -> list[Departure]:
        """Remove a worker that is gone and all its connections. Returns those removed."""
        return await forget_worker(self.redis, self.keys, wid)

    async def expired(self) -> list[str]:
        """Registered workers, of any node, whose heartbeat key is gone."""
        workers: list[str] = await self.redis.execute("HKEYS", self.keys.workers)
        if not workers:
            return []
        alive = await self.redis.pipeline([("EXISTS", self.keys.alive(w)) for w in workers])
        return [wid for wid, is_alive in zip(workers, alive, strict=True) if not is_alive]

    async def sweep(self, only: Collection[str] | None = None) -> dict[str, list[Departure]]:
        """Remove the state of every worker whose heartbeat expired (of those in `only`).

        Returns, for each worker swept by this call, the connections removed.
        """
        swept = {}
        for wid in await self.expired():
            if only is not None and wid not in only:
                continue
            # HDEL is the claim: of several nodes sweeping at once, one cleans each worker.
            if await self.redis.execute("HDEL", self.keys.workers, wid):
                swept[wid] = await forget_worker(self.redis, self.keys, wid, deregister=False)
        return swept

    async def node_workers(self) -> list[str]:
        """The workers of this node whose heartbeat is current, in no particular order."""
        workers = _pairs(await self.redis.execute("HGETALL", self.keys.workers))
        mine = [wid for wid, node in workers.items() if node == self.node_id]
        if not mine:
            return []
        alive = await self.redis.pipeline([("EXISTS", self.keys.alive(w)) for w in mine])
        return [wid for wid, is_alive in zip(mine, alive, strict=True) if is_alive]


async def remove_connection(client: Client, keys: Keys, cid: str) -> Departure | None:
    """Remove a connection's state. None if another caller removed it first."""
    key = keys.conn(cid)
    flat, deleted = await client.transaction([("HGETALL", key), ("DEL", key)])
    record = _pairs(flat)
    if not deleted or "user" not in record:
        return None
    user = record["user"]
    commands: list[Command] = []
    rooms = []
    for name in record:
        if name.startswith(ROOM_FIELD):
            rooms.append(name[len(ROOM_FIELD) :])
            commands.append(("HDEL", keys.topic(TopicKind.ROOM, rooms[-1]), cid))
        elif name.startswith(CHANNEL_FIELD):
            commands.append(
                ("HDEL", keys.topic(TopicKind.CHANNEL, name[len(CHANNEL_FIELD) :]), cid)
            )
    commands += [
        ("HDEL", keys.user(user), cid),
        ("HDEL", keys.worker_conns(record.get("worker", "")), cid),
        ("EVAL", _DECR_USER, 1, keys.users, user),
    ]
    await client.pipeline(commands)
    return Departure(user, tuple(rooms))


async def forget_worker(
    client: Client, keys: Keys, wid: str, *, deregister: bool = True
) -> list[Departure]:
    """Remove every connection `wid` held, then (with `deregister`) the worker itself.

    Returns the connections this call removed.
    """
    cids: list[str] = await client.execute("HKEYS", keys.worker_conns(wid))
    removed: list[Departure] = []
    for start in range(0, len(cids), _BATCH):
        batch = cids[start : start + _BATCH]
        results = await asyncio.gather(*(remove_connection(client, keys, cid) for cid in batch))
        removed += [departure for departure in results if departure is not None]
    await client.execute("DEL", keys.worker_conns(wid))
    if deregister:
        await client.pipeline([("HDEL", keys.workers, wid), ("DEL", keys.alive(wid))])
    if removed:
        logger.info("removed %d connections of worker %s from redis", len(removed), wid)
    return removed
