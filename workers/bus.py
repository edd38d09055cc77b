"""The message bus: Redis PUBLISH and SUBSCRIBE on two lean connections (`shoal.workers.resp`).

This is the hot path of every cross-worker message: see `resp` for why it does not go
through redis-py.

PUBLISH is fire-and-forget in Redis: a worker that is reconnecting misses what was
published meanwhile. Senders get an error for what they publish while the bus is down,
and clients resync on reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable
from typing import Any

import hiredis

from shoal.server.errors import ServiceUnavailable
from shoal.workers.resp import Link, RedisAddress, open_link

logger = logging.getLogger(__name__)

_MESSAGE = b"message"
_SUBSCRIBE = b"subscribe"
_PUSH_KINDS = frozenset((_MESSAGE, _SUBSCRIBE, b"unsubscribe"))
_SUBSCRIBE_CHUNK = 512
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0

OnMessages = Callable[[list[tuple[bytes, bytes]]], None]


class Bus:
    """PUBLISH and SUBSCRIBE for one worker, reconnecting on its own.

    Subscriptions are reference-counted per channel: the first `subscribe()` sends
    SUBSCRIBE and waits for Redis to confirm it, later ones return at once; the last
    `unsubscribe()` sends UNSUBSCRIBE. After a reconnect every channel still wanted is
    subscribed again.

    Args:
        address: the Redis server.
        on_messages: called with `[(channel, data), ...]`, every message of one read from
            Redis in order, inside the read callback: it must not block.
        on_state: called with True when both connections are up, False when one drops.
    """

    def __init__(
        self,
        address: RedisAddress,
        on_messages: OnMessages,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.address = address
        self.on_messages = on_messages
        self.on_state = on_state
        self.wanted: dict[bytes, int] = {}
        self.confirmations: dict[bytes, collections.deque[asyncio.Future[None]]] = {}
        self.publisher: Link | None = None
        self.subscriber: Link | None = None
        self.up = False
        self._wake = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        """Connect both links once, then keep them connected in the background.

        Returns even if Redis is unreachable: the bus keeps retrying, and `up` says so.
        """
        await self._connect_missing()
        self._supervisor = asyncio.create_task(self._supervise(), name="bus-supervisor")

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        for link in (self.publisher, self.subscriber):
            if link is not None:
                link.close()

    def post(self, channel: bytes, data: bytes) -> None:
        """Publish `data` on `channel` without waiting for Redis's reply.

        Handlers that do not wait go on with the client's next message in the same loop
        turn, so a burst of messages leaves in one write and comes back from Redis in one
        read, which the hub then writes once per client.

        Raises:
            ServiceUnavailable: the bus is not connected.
        """
        if self.publisher is None:
            raise ServiceUnavailable()
        self.publisher.send_unanswered(b"PUBLISH", channel, data)

    async def subscribe(self, channel: bytes) -> None:
        """Count one more local interest in `channel`; return once Redis delivers it here.

        Raises:
            ServiceUnavailable: the bus is down. The interest is not counted.
        """
        link = self.subscriber
        if link is None:
            raise ServiceUnavailable()
        count = self.wanted.get(channel, 0)
        self.wanted[channel] = count + 1
        waiters = self.confirmations.setdefault(channel, collections.deque())
        if count == 0:
            waiter: asyncio.Future[None] = link.loop.create_future()
            waiters.append(waiter)
            link.send_quiet(b"SUBSCRIBE", channel)
        elif waiters:
            waiter = waiters[-1]
        else:
            return
        try:
            await asyncio.shield(waiter)
        except ServiceUnavailable:
            self.unsubscribe(channel)
            raise

    def unsubscribe(self, channel: bytes) -> None:
        """Count one less local interest in `channel`; UNSUBSCRIBE when none is left."""
        count = self.wanted.get(channel, 0) - 1
        if count > 0:
            self.wanted[channel] = count
            return
        self.wanted.pop(channel, None)
        if self.subscriber is not None:
            self.subscriber.send_quiet(b"UNSUBSCRIBE", channel)

    def _on_push(self, replies: list[list[Any]]) -> None:
        messages = []
        for kind, channel, data in replies:
            if kind == _MESSAGE:
                messages.append((channel, data))
            elif kind == _SUBSCRIBE:
                waiters = self.confirmations.get(channel)
                if waiters:
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(None)
                    if not waiters:
                        del self.confirmations[channel]
        if messages:
            self.on_messages(messages)

    def _on_lost(self, link: Link) -> None:
        if link is self.publisher:
            self.publisher = None
        elif link is self.subscriber:
            self.subscriber = None
            error = ServiceUnavailable()
            for waiters in self.confirmations.values():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(error)
                        # Nobody may be awaiting it (its joiner left): mark it retrieved.
                        waiter.exception()
            self.confirmations.clear()
        else:
            return  # a link that failed while opening: _connect_missing() reports it
        if not self._closing:
            logger.warning("redis bus connection to %s lost; reconnecting", self.address)
        self._set_state()
        self._wake.set()

    def _set_state(self) -> None:
        up = self.publisher is not None and self.subscriber is not None
        if up != self.up:
            self.up = up
            if self.on_state is not None:
                self.on_state(up)

    async def _supervise(self) -> None:
        delay = _BACKOFF_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not self._closing and (self.publisher is None or self.subscriber is None):
                await asyncio.sleep(delay)
                if await self._connect_missing():
                    logger.info("redis bus reconnected to %s", self.address)
                    delay = _BACKOFF_MIN
                else:
                    delay = min(delay * 2, _BACKOFF_MAX)

    async def _connect_missing(self) -> bool:
        try:
            if self.publisher is None:
                self.publisher = await self._open(None)
            if self.subscriber is None:
                subscriber = await self._open(self._on_push)
                for chunk in _chunks(list(self.wanted), _SUBSCRIBE_CHUNK):
                    subscriber.send_quiet(b"SUBSCRIBE", *chunk)
                self.subscriber = subscriber
        except (OSError, ServiceUnavailable, hiredis.ReplyError, TimeoutError) as exc:
            logger.debug("redis bus cannot connect to %s: %r", self.address, exc)
            return False
        finally:
            self._set_state()
        return True

    async def _open(self, on_push: Callable[[list[list[Any]]], None] | None) -> Link:
        # Pub/sub ignores database numbers, so no SELECT.
        return await open_link(
            self.address,
            on_push=on_push,
            on_lost=self._on_lost,
            push_kinds=_PUSH_KINDS,
            select_db=False,
        )


def _chunks(items: list[bytes], size: int) -> Iterable[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
