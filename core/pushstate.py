"""The state of Pusher channels in Redis: who subscribes, presence members, occupied
channels, cache channels' last events (the key layout is in `shoal.core.keys`).

Every transition Pusher announces is decided by one atomic counter, so that it is
announced once across every worker and node, however subscriptions interleave:

- a channel is *occupied* when its count in `P:pushchans:<app>` goes from 0 to 1, and
  *vacated* when it goes back to 0 (the field is deleted then);
- a presence member is *added* when its count in `P:pushusers:<app>:<channel>` goes from
  0 to 1 (its first connection), and *removed* when it goes back to 0 (its last).

A dead worker's subscriptions are removed by the sweep like its rooms
(`shoal.core.registry.remove_connection`), which reports the same transitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from shoal.core import envelope, pusher
from shoal.core.keys import PUSHER_FIELD, Keys
from shoal.core.resp import Client

# A count going down, its field deleted at zero (as `registry._DECR_USER`): one key.
DECREMENT = (
    "local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1) "
    "if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end return n"
)
CACHE_TTL = 30 * 60
"""Seconds a cache channel keeps its last event (Pusher keeps it 30 minutes)."""

Command = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Change:
    """What a subscription or an unsubscription changed.

    Attributes:
        subscriptions: the channel's subscriptions after it (0: vacated).
        connections: on a presence channel, the member's connections in it after it
            (1 after a subscription: the member was added; 0 after an unsubscription:
            removed); 0 elsewhere.
        members: on a presence channel, its distinct members after it.
    """

    subscriptions: int
    connections: int = 0
    members: int = 0

    @property
    def occupied(self) -> bool:
        """The subscription made the channel occupied (its first)."""
        return self.subscriptions == 1

    @property
    def vacated(self) -> bool:
        return self.subscriptions == 0


@dataclass(frozen=True, slots=True)
class Left:
    """A subscription a cleanup removed (its connection is gone)."""

    app: str
    channel: str
    member: str
    """The presence member's user id, "" on other channels."""
    change: Change


def field(app: str, channel: str) -> str:
    """The connection hash's field for a subscription."""
    return f"{PUSHER_FIELD}{app}:{channel}"


def parse_field(name: str) -> tuple[str, str]:
    """(app, channel) of a connection hash's Pusher field (`name` starts with `p:`)."""
    app, _, channel = name[len(PUSHER_FIELD) :].partition(":")
    return app, channel


def subscribe_commands(
    keys: Keys, app: str, channel: str, cid: str, *, member: str, info: Any
) -> list[Command]:
    """The commands that record a subscription; `member` "" for a non-presence channel."""
    value = orjson.dumps([member, info]) if member else ""
    commands: list[Command] = [
        ("HSET", keys.conn(cid), field(app, channel), member),
        ("HSET", keys.pusher_topic(app, channel), cid, value),
        ("HINCRBY", keys.pusher_channels(app), channel, 1),
    ]
    if member:
        members = keys.pusher_members(app, channel)
        commands += [("HINCRBY", members, member, 1), ("HLEN", members)]
    return commands


def unsubscribe_commands(
    keys: Keys, app: str, channel: str, cid: str, member: str, *, own: bool = True
) -> list[Command]:
    """The commands that remove a subscription (`own`: the connection's hash field too;
    a cleanup has deleted the whole hash already)."""
    commands: list[Command] = [("HDEL", keys.pusher_topic(app, channel), cid)]
    if own:
        commands.append(("HDEL", keys.conn(cid), field(app, channel)))
    commands.append(("EVAL", DECREMENT, 1, keys.pusher_channels(app), channel))
    if member:
        members = keys.pusher_members(app, channel)
        commands += [("EVAL", DECREMENT, 1, members, member), ("HLEN", members)]
    return commands


def change(replies: Sequence[Any], member: str) -> Change:
    """The `Change` from the replies of `subscribe_commands` or `unsubscribe_commands`."""
    if member:
        return Change(max(0, int(replies[-3])), max(0, int(replies[-2])), int(replies[-1]))
    return Change(max(0, int(replies[-1])))


class Channels:
    """Pusher channel state operations (a worker's, or the HTTP API's)."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self.redis = client
        self.keys = keys

    async def subscribe(
        self, app: str, channel: str, cid: str, member: str = "", info: Any = None
    ) -> Change:
        """Record a subscription of `cid`, which has none to `channel` yet."""
        replies = await self.redis.pipeline(
            subscribe_commands(self.keys, app, channel, cid, member=member, info=info)
        )
        return change(replies, member)

    async def unsubscribe(self, app: str, channel: str, cid: str, member: str = "") -> Change:
        """Remove a subscription of `cid` recorded by `subscribe()`."""
        replies = await self.redis.pipeline(
            unsubscribe_commands(self.keys, app, channel, cid, member)
        )
        return change(replies, member)

    async def members(self, app: str, channel: str) -> dict[str, Any]:
        """A presence channel's members: user id -> user_info (of any of its connections)."""
        values: list[str] = await self.redis.execute("HVALS", self.keys.pusher_topic(app, channel))
        members: dict[str, Any] = {}
        for value in values:
            if value:
                user_id, info = orjson.loads(value)
                members[user_id] = info
        return members

    async def member_ids(self, app: str, channel: str) -> list[str]:
        """A presence channel's distinct user ids."""
        ids: list[str] = await self.redis.execute("HKEYS", self.keys.pusher_members(app, channel))
        return ids

    async def occupied(self, app: str) -> dict[str, int]:
        """Every occupied channel of `app` -> its subscriptions."""
        flat: list[str] = await self.redis.execute("HGETALL", self.keys.pusher_channels(app))
        it = iter(flat)
        return {name: int(count) for name, count in zip(it, it, strict=True)}

    async def subscriptions(self, app: str, channel: str) -> int:
        count = await self.redis.execute("HGET", self.keys.pusher_channels(app), channel)
        return int(count or 0)

    async def user_counts(self, app: str, channels: Sequence[str]) -> list[int]:
        """The distinct members of each presence channel."""
        if not channels:
            return []
        replies = await self.redis.pipeline(
            [("HLEN", self.keys.pusher_members(app, name)) for name in channels]
        )
        return [int(n) for n in replies]

    async def cached(self, app: str, channel: str) -> bytes | None:
        """The last event published on a cache channel, as sent; None: a cache miss."""
        value = await self.redis.execute("GET", self.keys.pusher_cache(app, channel))
        return None if value is None else str(value).encode()

    def cache_command(self, app: str, channel: str, frame: bytes) -> Command:
        """The command that keeps `frame` as a cache channel's last event."""
        return ("SET", self.keys.pusher_cache(app, channel), frame, "EX", CACHE_TTL)


def removed_notice(keys: Keys, left: Left) -> tuple[bytes, bytes] | None:
    """The bus message announcing that a cleanup removed a presence member's last
    connection (`pusher_internal:member_removed`), as (channel, envelope); None when
    the member is still there or the channel has no presence."""
    if not left.member or left.change.connections:
        return None
    payload = pusher.frame("pusher_internal:member_removed", {"user_id": left.member}, left.channel)
    return keys.bus_pusher(left.app, left.channel), envelope.message(payload, None)
