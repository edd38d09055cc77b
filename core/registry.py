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

from shoal.core import pushstate
from shoal.core.history import Position
from shoal.core.keys import CHANNEL_FIELD, PUSHER_FIELD, ROOM_FIELD, Keys, TopicKind
from shoal.core.resp import Client, RedisAddress, Timeouts
from shoal.core.schema import PresenceEntry

logger = logging.getLogger(__name__)

# A user's count going down, its field deleted at zero: one key, so it stays atomic on
# Redis Cluster. EVAL rather than EVALSHA: Redis caches the compiled script, and no
# NOSCRIPT can follow a Redis restart. (Counts go up with a plain HINCRBY.)
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


def _listing(users_key: str, limit: int | None) -> Command:
    """The command listing a topic's distinct users: all, or up to `limit` of them
    (HRANDFIELD with a positive count returns distinct fields, all of a small hash)."""
    return ("HKEYS", users_key) if limit is None else ("HRANDFIELD", users_key, limit)


class Members(list[str]):
    """Distinct user ids of a room or channel (perhaps a sample of them), and `total`,
    how many distinct users it has. A join of a room with a history also says where it
    stands (`position`), and one with `since` whether the client was caught up
    (`recovered`; `reason` when it was not)."""

    def __init__(self, users: Iterable[str], *, total: int) -> None:
        super().__init__(users)
        self.total = total
        self.position: Position | None = None
        self.recovered: bool | None = None
        self.reason: str | None = None


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
    address: str | None = None
    """The client address whose slot it holds (`limits.connections_per_ip`), if any."""
    pushed: Iterable[tuple[str, str, str, Any]] = ()
    """Its Pusher subscriptions: (app, channel, presence member or "", user_info)."""


@dataclass(frozen=True, slots=True)
class Departure:
    """A connection a cleanup removed: whose it was, which rooms it was in, and the
    Pusher subscriptions it had, with what removing each changed."""

    user: str
    rooms: tuple[str, ...]
    pushed: tuple[pushstate.Left, ...] = ()


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

    def submit_connection(self, snapshot: Snapshot) -> asyncio.Future[list[Any]]:
        """Record a new connection: its commands leave at once, in one pipeline, and the
        future gets their replies (a future and a callback, no task: the connect path).

        Raises:
            ServiceUnavailable: Redis cannot take the commands now.
        """
        return self.redis.submit(self._write_connection(snapshot))

    def _write_connection(self, snapshot: Snapshot) -> list[Command]:
        """The commands that record `snapshot`.

        Plain commands, no script: a user's connection count goes up with HINCRBY
        alone (going down needs a script, to delete the field at zero atomically).
        EVAL costs Redis a script lookup and a Lua call per connection.
        """
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
        for kind, names in (
            (TopicKind.ROOM, snapshot.rooms),
            (TopicKind.CHANNEL, snapshot.channels),
        ):
            for name in names:
                commands.append(("HSET", keys.topic(kind, name), cid, snapshot.user))
                commands.append(("HINCRBY", keys.topic_users(kind, name), snapshot.user, 1))
        for app, channel, member, info in snapshot.pushed:
            commands += pushstate.subscribe_commands(
                keys, app, channel, cid, member=member, info=info
            )
        commands += [
            ("HSET", keys.user(snapshot.user), cid, self.worker_id),
            ("HSET", keys.worker_conns(self.worker_id), cid, snapshot.user),
            ("HINCRBY", keys.users, snapshot.user, 1),
        ]
        return commands

    async def remove_connection(self, cid: str) -> Departure | None:
        """Remove a connection and every trace of it. None if it was already gone."""
        return await remove_connection(self.redis, self.keys, cid)

    async def join(
        self, kind: TopicKind, name: str, cid: str, user: str, limit: int | None = None
    ) -> Members:
        """Add a connection that is not in a room or channel yet, in one round trip.

        Returns up to `limit` of the members' distinct user ids (all with None), and
        their number. A room's members are a sample of it once it has more than
        `limit`: listing every member on every join would make a join storm cost the
        square of the room's size.
        """
        users = self.keys.topic_users(kind, name)
        results = await self.redis.pipeline(
            [
                ("HSET", self.keys.conn(cid), kind.field_prefix + name, 1),
                ("HSET", self.keys.topic(kind, name), cid, user),
                ("HINCRBY", users, user, 1),
                _listing(users, limit),
                ("HLEN", users),
            ]
        )
        return Members(results[-2] or (), total=int(results[-1]))

    async def leave(
        self, kind: TopicKind, name: str, cid: str, user: str, limit: int | None = None
    ) -> Members:
        """Remove a connection that is in a room or channel. Returns up to `limit` of the
        remaining members' distinct user ids (all with None), and their number.

        Redis deletes a hash when its last field goes, so an empty room disappears.
        """
        users = self.keys.topic_users(kind, name)
        results = await self.redis.pipeline(
            [
                ("HDEL", self.keys.topic(kind, name), cid),
                ("HDEL", self.keys.conn(cid), kind.field_prefix + name),
                ("EVAL", _DECR_USER, 1, users, user),
                _listing(users, limit),
                ("HLEN", users),
            ]
        )
        return Members(results[-2] or (), total=int(results[-1]))

    async def reconcile(
        self, kind: TopicKind, name: str, cid: str, user: str, member: bool
    ) -> None:
        """Make Redis agree that `cid` is (or is not) a member of `name`, whatever a failed
        join or leave left half-written. The user count moves only if membership did."""
        topic = self.keys.topic(kind, name)
        field = kind.field_prefix + name
        if member:
            changed, _ = await self.redis.pipeline(
                [("HSET", topic, cid, user), ("HSET", self.keys.conn(cid), field, 1)]
            )
            if changed:
                await self.redis.execute("HINCRBY", self.keys.topic_users(kind, name), user, 1)
        else:
            changed, _ = await self.redis.pipeline(
                [("HDEL", topic, cid), ("HDEL", self.keys.conn(cid), field)]
            )
            if changed:
                users = self.keys.topic_users(kind, name)
                await self.redis.execute("EVAL", _DECR_USER, 1, users, user)

    async def members(self, kind: TopicKind, name: str, limit: int | None = None) -> Members:
        """Up to `limit` (all with None) of the distinct user ids in a room or channel,
        and their number."""
        users = self.keys.topic_users(kind, name)
        sample, total = await self.redis.pipeline([_listing(users, limit), ("HLEN", users)])
        return Members(sample or (), total=int(total))

    async def set_metadata(self, cid: str, metadata: dict[str, Any]) -> None:
        await self.redis.execute("HSET", self.keys.conn(cid), "meta", orjson.dumps(metadata))

    async def ban(self, user: str, seconds: int, record: dict[str, Any]) -> None:
        """Ban `user` for `seconds` (replacing a ban it had)."""
        await self.redis.execute("SET", self.keys.ban(user), orjson.dumps(record), "EX", seconds)

    async def unban(self, user: str) -> bool:
        """Lift `user`'s ban. Returns whether there was one."""
        return bool(await self.redis.execute("DEL", self.keys.ban(user)))

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
            # Slots go back as they were, over any cap: these connections are open.
            commands += [
                c
                for s in snapshots[start : start + _BATCH]
                if s.address is not None
                for c in hold_address(self.keys, self.worker_id, s.address, s.cid)
            ]
            await self.redis.pipeline(commands)

    async def release_address(self, ip: str, cid: str) -> None:
        """Give back the slot of `ip` that `cid` held (`limits.connections_per_ip`)."""
        await self.redis.pipeline(release_address(self.keys, self.worker_id, ip, cid))

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
    # Pusher subscriptions: (app, channel, member, where their replies end).
    pushed: list[tuple[str, str, str, int]] = []
    for name, value in record.items():
        if name.startswith(ROOM_FIELD):
            kind, topic = TopicKind.ROOM, name[len(ROOM_FIELD) :]
            rooms.append(topic)
        elif name.startswith(CHANNEL_FIELD):
            kind, topic = TopicKind.CHANNEL, name[len(CHANNEL_FIELD) :]
        elif name.startswith(PUSHER_FIELD):
            app, channel = pushstate.parse_field(name)
            commands += pushstate.unsubscribe_commands(keys, app, channel, cid, value, own=False)
            pushed.append((app, channel, value, len(commands)))
            continue
        else:
            continue
        commands.append(("HDEL", keys.topic(kind, topic), cid))
        commands.append(("EVAL", _DECR_USER, 1, keys.topic_users(kind, topic), user))
    commands += [
        ("HDEL", keys.user(user), cid),
        ("HDEL", keys.worker_conns(record.get("worker", "")), cid),
        ("EVAL", _DECR_USER, 1, keys.users, user),
    ]
    replies = await client.pipeline(commands)
    left = tuple(
        pushstate.Left(app, channel, member, pushstate.change(replies[:end], member))
        for app, channel, member, end in pushed
    )
    return Departure(user, tuple(rooms), left)


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
    # The address slots it held, connections and handshakes alike (`release_address`).
    slots = _pairs(await client.execute("HGETALL", keys.worker_addresses(wid)))
    if slots:
        await client.pipeline([("HDEL", keys.address(ip), cid) for cid, ip in slots.items()])
        # Not DEL: a live worker (`resync`) may have taken a slot since HGETALL.
        await client.execute("HDEL", keys.worker_addresses(wid), *slots)
    if deregister:
        await client.pipeline([("HDEL", keys.workers, wid), ("DEL", keys.alive(wid))])
    if removed:
        logger.info("removed %d connections of worker %s from redis", len(removed), wid)
    return removed


def hold_address(keys: Keys, wid: str, ip: str, cid: str) -> list[Command]:
    """The commands that record, without a check, that `cid` of worker `wid` holds a slot
    of the client address `ip` (the index first: a sweep finds what it lists)."""
    return [("HSET", keys.worker_addresses(wid), cid, ip), ("HSET", keys.address(ip), cid, wid)]


def release_address(keys: Keys, wid: str, ip: str, cid: str) -> list[Command]:
    """The commands that give back the slot of `ip` that `cid` of worker `wid` holds
    (idempotent)."""
    return [("HDEL", keys.address(ip), cid), ("HDEL", keys.worker_addresses(wid), cid)]
