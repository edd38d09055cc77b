"""Reach shoal's clients from any Python process, through Redis alone: publish-only.

A Django view, a cron job or a task worker has no WebSocket and no hub, but it can
publish on the bus the workers listen to, as Socket.IO's Redis emitter does for Node::

    from shoal.core.emitter import Emitter

    emitter = Emitter("redis://localhost:6379/0", prefix="shoal")
    emitter.to_room("lobby").send({"type": "news", "text": "deploy at 5"})
    emitter.to_user("ann").send({"type": "invoice_ready", "id": 42})
    emitter.to_all().send({"type": "maintenance", "in_minutes": 10})
    emitter.trigger("1234", "orders", "order.shipped", {"id": 7})  # a Pusher channel

`AsyncEmitter` has the same methods for asyncio code (`await ... .send(...)`). Both use
redis-py, which a process outside shoal is likely to have configured already; pass
your own client instead of a URL to share its pool.

A message is a mapping (sent as JSON text), a `str` (text frame) or `bytes` (binary
frame). Delivery is what the workers give their own messages: at most once, to the
connections present when it arrives. The prefix must be the server's `redis.prefix`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import redis
import redis.asyncio

from shoal.core import envelope, protocol, pusher, pushstate
from shoal.core.keys import Keys, TopicKind

Sendable = Mapping[str, Any] | str | bytes

# A hung Redis must not hang the caller: a view or a cron job gets an error instead.
_SOCKET_TIMEOUT = 5.0


def _encode(message: Sendable) -> tuple[bytes, bool]:
    """The payload and whether it is text."""
    if isinstance(message, bytes):
        return message, False
    if isinstance(message, str):
        return message.encode(), True
    return protocol.encode(message), True


def _by_worker(connections: Mapping[Any, Any]) -> dict[str, list[str]]:
    """`{connection id: worker id}` from a user's hash, grouped by worker."""
    grouped: dict[str, list[str]] = {}
    for cid, wid in connections.items():
        grouped.setdefault(_text(wid), []).append(_text(cid))
    return grouped


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Emitter:
    """Publish to shoal's clients from synchronous code.

    Args:
        redis_url: the server's `redis.url` (not `embedded`: that Redis listens on a
            private socket), or a `redis.Redis` client to use as it is.
        prefix: the server's `redis.prefix`.
    """

    def __init__(self, redis_url: str | redis.Redis, prefix: str = "shoal") -> None:
        if isinstance(redis_url, str):
            redis_url = redis.Redis.from_url(
                redis_url,
                socket_timeout=_SOCKET_TIMEOUT,
                socket_connect_timeout=_SOCKET_TIMEOUT,
            )
        self.redis = redis_url
        self.keys = Keys(prefix)

    def to_room(self, room: str) -> Target:
        return Target(self, self.keys.bus_topic(TopicKind.ROOM, room))

    def to_channel(self, channel: str) -> Target:
        return Target(self, self.keys.bus_topic(TopicKind.CHANNEL, channel))

    def to_all(self) -> Target:
        return Target(self, self.keys.bus_all)

    def to_user(self, user_id: str) -> UserTarget:
        return UserTarget(self, user_id)

    def trigger(
        self, app_id: str, channel: str, event: str, data: Any, *, socket_id: str | None = None
    ) -> int:
        """Send `event` to the subscribers of a Pusher channel of app `app_id` (but
        `socket_id`), as the HTTP API's `POST /apps/{id}/events` does: `data` goes out
        as it is if it is a string, as JSON otherwise. Returns how many workers were
        listening (0: nobody there). A cache channel keeps it as its last event.

        Raises:
            redis.RedisError: Redis could not be reached or refused a command.
            pusher.PusherError: not a valid channel name.
        """
        payload = pusher.frame(event, data, pusher.channel(channel).name)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.publish(
                self.keys.bus_pusher(app_id, channel), envelope.message(payload, socket_id)
            )
            if pusher.channel(channel).cache:
                pipe.set(self.keys.pusher_cache(app_id, channel), payload, ex=pushstate.CACHE_TTL)
            return int(pipe.execute()[0])

    def close(self) -> None:
        self.redis.close()


class Target:
    """Every connection in a room or channel, or every connection of the deployment."""

    def __init__(self, emitter: Emitter, channel: bytes) -> None:
        self.emitter = emitter
        self.channel = channel

    def send(self, message: Sendable) -> int:
        """Publish `message`. Returns how many workers were listening (0: nobody there).

        Raises:
            redis.RedisError: Redis could not be reached or refused the command.
        """
        payload, text = _encode(message)
        return int(
            self.emitter.redis.publish(self.channel, envelope.message(payload, None, text=text))
        )


class UserTarget:
    """Every connection of one user, on whichever workers and nodes hold them."""

    def __init__(self, emitter: Emitter, user_id: str) -> None:
        self.emitter = emitter
        self.user_id = user_id

    def send(self, message: Sendable) -> int:
        """Publish `message` to each worker holding a connection of the user.

        Returns how many connections the user had (0: not connected; nothing was sent).

        Raises:
            redis.RedisError: as `Target.send`.
        """
        emitter = self.emitter
        connections = emitter.redis.hgetall(emitter.keys.user(self.user_id))
        payload, text = _encode(message)
        with emitter.redis.pipeline(transaction=False) as pipe:
            for wid, cids in _by_worker(connections).items():
                pipe.publish(
                    emitter.keys.bus_worker(wid), envelope.message(payload, cids, text=text)
                )
            pipe.execute()
        return len(connections)


class AsyncEmitter:
    """`Emitter` for asyncio code: the same methods, awaited.

    Args:
        redis_url: as for `Emitter`, or a `redis.asyncio.Redis` client.
        prefix: the server's `redis.prefix`.
    """

    def __init__(self, redis_url: str | redis.asyncio.Redis, prefix: str = "shoal") -> None:
        if isinstance(redis_url, str):
            redis_url = redis.asyncio.Redis.from_url(
                redis_url,
                socket_timeout=_SOCKET_TIMEOUT,
                socket_connect_timeout=_SOCKET_TIMEOUT,
            )
        self.redis = redis_url
        self.keys = Keys(prefix)

    def to_room(self, room: str) -> AsyncTarget:
        return AsyncTarget(self, self.keys.bus_topic(TopicKind.ROOM, room))

    def to_channel(self, channel: str) -> AsyncTarget:
        return AsyncTarget(self, self.keys.bus_topic(TopicKind.CHANNEL, channel))

    def to_all(self) -> AsyncTarget:
        return AsyncTarget(self, self.keys.bus_all)

    def to_user(self, user_id: str) -> AsyncUserTarget:
        return AsyncUserTarget(self, user_id)

    async def trigger(
        self, app_id: str, channel: str, event: str, data: Any, *, socket_id: str | None = None
    ) -> int:
        """As `Emitter.trigger`."""
        payload = pusher.frame(event, data, pusher.channel(channel).name)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.publish(
                self.keys.bus_pusher(app_id, channel), envelope.message(payload, socket_id)
            )
            if pusher.channel(channel).cache:
                pipe.set(self.keys.pusher_cache(app_id, channel), payload, ex=pushstate.CACHE_TTL)
            return int((await pipe.execute())[0])

    async def tell_departed(
        self, worker_id: str, users: Iterable[tuple[str, Iterable[str]]]
    ) -> None:
        """Have worker `worker_id` run the application's `on_departed` for `users`
        (`(user_id, rooms)` pairs): what a node's housekeeper does after a cleanup.

        Raises:
            redis.RedisError: as `AsyncTarget.send`.
        """
        data = envelope.departed((user, list(rooms)) for user, rooms in users)
        await self.redis.publish(self.keys.bus_worker(worker_id), data)

    async def tell_left(self, lefts: Iterable[pushstate.Left]) -> None:
        """Announce presence members that left with subscriptions a cleanup removed
        (`pusher_internal:member_removed` on their channels, on every node).

        Raises:
            redis.RedisError: as `AsyncTarget.send`.
        """
        notices = [n for left in lefts if (n := pushstate.removed_notice(self.keys, left))]
        if not notices:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, data in notices:
                pipe.publish(channel, data)
            await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()


class AsyncTarget:
    """`Target` for `AsyncEmitter`."""

    def __init__(self, emitter: AsyncEmitter, channel: bytes) -> None:
        self.emitter = emitter
        self.channel = channel

    async def send(self, message: Sendable) -> int:
        """As `Target.send`."""
        payload, text = _encode(message)
        data = envelope.message(payload, None, text=text)
        return int(await self.emitter.redis.publish(self.channel, data))


class AsyncUserTarget:
    """`UserTarget` for `AsyncEmitter`."""

    def __init__(self, emitter: AsyncEmitter, user_id: str) -> None:
        self.emitter = emitter
        self.user_id = user_id

    async def send(self, message: Sendable) -> int:
        """As `UserTarget.send`."""
        emitter = self.emitter
        connections = await emitter.redis.hgetall(emitter.keys.user(self.user_id))
        payload, text = _encode(message)
        async with emitter.redis.pipeline(transaction=False) as pipe:
            for wid, cids in _by_worker(connections).items():
                pipe.publish(
                    emitter.keys.bus_worker(wid), envelope.message(payload, cids, text=text)
                )
            await pipe.execute()
        return len(connections)
