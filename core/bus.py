"""The message bus: Redis PUBLISH and SUBSCRIBE on two lean connections (`shoal.core.resp`).

This is the hot path of every cross-worker message: see `resp` for why it does not go
through redis-py.

PUBLISH is fire-and-forget in Redis: a worker that is reconnecting misses what was
published meanwhile. Senders get `ServiceUnavailable` for what they publish while the
bus is down, or while Redis has left a publish unanswered for `redis.stall_timeout`
seconds; clients resync on reconnect.

Backpressure. Redis takes PUBLISH as fast as a worker writes it, then holds in every
subscriber's output buffer what that subscriber has not read yet; past its
`client-output-buffer-limit pubsub` it drops the subscriber, and everything published to
that worker meanwhile is lost. So publishing is paced by the slowest reader: `congested`
is true while the publisher connection has more than `Backlogs.publish` bytes unsent,
or while any subscriber connection of the deployment (named `Backlogs.name`'s prefix
with CLIENT SETNAME) holds more than `Backlogs.subscriber` bytes in Redis, as the `omem`
of `CLIENT LIST TYPE pubsub` shows, counting what this worker published since. The bus
reads that every `_WATCH_EVERY` seconds while it publishes. A caller that sees
`congested` waits in `relieved()` (the hub holds the client that published, whose
further messages then wait unread: `shoal.workers.sessions`).

Pub/sub replies are matched to the commands that caused them. Redis confirms a
`SUBSCRIBE a b` with one push per channel, in order, or refuses the whole command with
one error reply (an ACL `NOPERM`, say). The bus keeps the commands it sent in order, so
an error fails exactly the subscriptions it refused, and every other room of the worker
goes on receiving.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shoal.core.errors import RedisReplyError, RedisUnavailable, ServiceUnavailable
from shoal.core.metrics import counters
from shoal.core.resp import Link, RedisAddress, Timeouts, open_link, tick

logger = logging.getLogger(__name__)

_MESSAGE = b"message"
_SUBSCRIBE = b"subscribe"
_UNSUBSCRIBE = b"unsubscribe"
_PONG = b"pong"
_PUSH_KINDS = frozenset((_MESSAGE, _SUBSCRIBE, _UNSUBSCRIBE, _PONG))
_SUBSCRIBE_CHUNK = 512
# How often the subscribers' backlogs in Redis are read while this worker publishes: at
# Redis's top PUBLISH rate on one core (~60 MB/s of 1 KB messages) a backlog grows about
# 3 MB in one period, well inside the margin between the bound and Redis's limit.
_WATCH_EVERY = 0.05
_UNWATCHED = 1 << 62

OnMessages = Callable[[list[tuple[bytes, bytes]]], None]


@dataclass(frozen=True, slots=True)
class Backlogs:
    """How far Redis may fall behind before publishers wait (`limits.*_backlog`).

    Attributes:
        publish: bytes unsent on the publisher connection.
        subscriber: bytes Redis holds for one subscriber connection of the deployment.
        name: this worker's subscriber connection's CLIENT SETNAME; "" for none (and
            no watch of the subscribers).
        peers: the prefix every subscriber name of the deployment starts with.
    """

    publish: int = 1024 * 1024
    subscriber: int = 4 * 1024 * 1024
    name: str = ""
    peers: str = ""


def largest_backlog(listing: bytes, peers: bytes) -> tuple[int, int]:
    """From a `CLIENT LIST` reply: the largest `omem` (bytes of output buffer) among
    the clients whose name starts with `peers`, and how many there are."""
    largest = count = 0
    for line in listing.splitlines():
        fields = dict(item.partition(b"=")[::2] for item in line.split(b" "))
        if fields.get(b"name", b"").startswith(peers):
            count += 1
            largest = max(largest, int(fields.get(b"omem", b"0")))
    return largest, count


@dataclass(slots=True)
class _Sent:
    """A SUBSCRIBE or UNSUBSCRIBE on the subscriber connection, not yet fully answered."""

    kind: bytes
    channels: collections.deque[bytes] = field(default_factory=collections.deque)


class Bus:
    """PUBLISH and SUBSCRIBE for one worker, reconnecting on its own.

    Subscriptions are reference-counted per channel: the first `subscribe()` sends
    SUBSCRIBE and waits for Redis to confirm it, later ones return at once; the last
    `unsubscribe()` sends UNSUBSCRIBE. After a reconnect every channel still wanted is
    subscribed again, and the bus counts as up only once Redis confirmed them all.

    Args:
        address: the Redis server.
        on_messages: called with `[(channel, data), ...]`, every message of one read from
            Redis in order, inside the read callback: it must not block.
        on_state: called with True when both connections are up, False when one drops.
        timeouts: connection limits; see `shoal.core.resp.Timeouts`.
        backlogs: when publishers wait; see the module docstring.
    """

    def __init__(
        self,
        address: RedisAddress,
        on_messages: OnMessages,
        on_state: Callable[[bool], None] | None = None,
        timeouts: Timeouts | None = None,
        backlogs: Backlogs | None = None,
    ) -> None:
        self.address = address
        self.on_messages = on_messages
        self.on_state = on_state
        self.timeouts = timeouts or Timeouts()
        self.backlogs = backlogs or Backlogs()
        self.subscriber_backlog = 0
        """The largest backlog in Redis among the deployment's subscribers, last read."""
        # Bytes published since the backlogs were last asked for: counted as backlog until
        # the next reading (which includes them: Redis runs one connection's commands in
        # order), so this worker alone cannot overshoot the bound between two readings.
        self._posted = 0
        # The subscribers' bound while their backlogs are watched; none otherwise.
        self._bound = self.backlogs.subscriber if self.backlogs.name else _UNWATCHED
        self._relief: list[asyncio.Future[None]] = []
        self.wanted: dict[bytes, int] = {}
        self.confirmations: dict[bytes, collections.deque[asyncio.Future[None]]] = {}
        self.publisher: Link | None = None
        self._scripts: dict[str, str] = {}  # SHA-1 -> text (`load_script`)
        self.subscriber: Link | None = None
        self.up = False
        self._sent: collections.deque[_Sent] = collections.deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._reconnecting = False  # a link was lost: getting both back is a reconnect

    async def start(self) -> None:
        """Connect both links once, then keep them connected in the background.

        Returns even if Redis is unreachable: the bus keeps retrying, and `up` says so.
        """
        if not await self._connect_missing():
            self._wake.set()  # the reconnect loop takes it from here
        self._tasks = [
            asyncio.create_task(self._reconnect(), name="bus-reconnect"),
            asyncio.create_task(self._monitor(), name="bus-monitor"),
            asyncio.create_task(self._watch(), name="bus-backlogs"),
        ]

    @property
    def stalled(self) -> bool:
        """Redis has left a publish unanswered past `stall_timeout`: publishes fail."""
        return self.publisher is not None and self.publisher.stalled

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The bus's background loops, for the owner to supervise."""
        return self._tasks

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for link in (self.publisher, self.subscriber):
            if link is not None:
                link.close()

    def post(self, channel: bytes, data: bytes) -> None:
        """Publish `data` on `channel` without waiting for Redis's reply.

        Handlers that do not wait go on with the client's next message in the same loop
        turn, so a burst of messages leaves in one write and comes back from Redis in one
        read, which the hub then writes once per client.

        Raises:
            RedisUnavailable: the bus is not connected, or Redis stopped answering.
        """
        if self.publisher is None:
            raise RedisUnavailable()
        self.publisher.send_unanswered(b"PUBLISH", channel, data)
        self._posted += len(data)

    def post_command(self, *args: Any) -> None:
        """Send a command that publishes (a script: `shoal.core.history.append`) without
        waiting for its reply, in order with `post()`s, counted as they are.

        Raises:
            RedisUnavailable: the bus is not connected, or Redis stopped answering.
        """
        if self.publisher is None:
            raise RedisUnavailable()
        self.publisher.send_unanswered(*args)
        self._posted += sum(len(arg) for arg in args if isinstance(arg, bytes))

    def load_script(self, script: str) -> str:
        """Have Redis cache `script` on the publisher connection, now and after every
        reconnection (before anything else is sent on it), so that `post_command` can
        run it by its SHA-1 (`EVALSHA`) rather than send its text with every call, and
        have Redis hash it each time. Returns the SHA-1."""
        sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        if sha not in self._scripts:
            self._scripts[sha] = script
            if self.publisher is not None:
                self.publisher.send_unanswered(b"SCRIPT", b"LOAD", script)
        return sha

    @property
    def congested(self) -> bool:
        """Redis is behind (see the module docstring): a publisher should wait in
        `relieved()` before it publishes more."""
        publisher = self.publisher
        return self.subscriber_backlog + self._posted > self._bound or (
            publisher is not None and publisher.unsent() > self.backlogs.publish
        )

    async def relieved(self) -> None:
        """Return once Redis has caught up, to half the bounds that made the bus
        `congested`, or after `timeouts.socket` seconds: a subscriber that does not catch
        up in that time is stuck (a frozen worker), and Redis's own limit drops it rather
        than hold every publisher of the deployment."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._relief.append(waiter)
        try:
            async with asyncio.timeout(self.timeouts.socket):
                await waiter
        except TimeoutError:
            pass
        finally:
            if not waiter.done():
                self._relief.remove(waiter)

    async def _watch(self) -> None:
        """Read the subscribers' backlogs while this worker publishes or waits; wake the
        waiters once Redis has caught up."""
        peers = self.backlogs.peers.encode()
        while True:
            await asyncio.sleep(_WATCH_EVERY)
            publisher = self.publisher
            if publisher is None or self._bound == _UNWATCHED:
                self.subscriber_backlog = self._posted = 0
            elif self._posted or self.subscriber_backlog or self._relief:
                self._posted = 0
                try:
                    listing = await publisher.send(b"CLIENT", b"LIST", b"TYPE", b"pubsub")
                except RedisReplyError as exc:
                    logger.warning(
                        "redis refused CLIENT LIST (%s): subscribers' backlogs are not "
                        "watched, only the publisher's",
                        exc,
                    )
                    self._bound = _UNWATCHED
                    self.subscriber_backlog = 0
                except ServiceUnavailable:
                    pass  # the connection is going: the next one is read again
                else:
                    self.subscriber_backlog = largest_backlog(listing, peers)[0]
            self._relieve()

    def _relieve(self) -> None:
        if not self._relief:
            return
        backlogs = self.backlogs
        publisher = self.publisher
        if self.subscriber_backlog + self._posted > self._bound // 2 or (
            publisher is not None and publisher.unsent() > backlogs.publish // 2
        ):
            return
        relief, self._relief = self._relief, []
        for waiter in relief:
            if not waiter.done():
                waiter.set_result(None)

    async def subscribe(self, channel: bytes) -> None:
        """Count one more local interest in `channel`; return once Redis delivers it here.

        Raises:
            ServiceUnavailable: the bus is down, or Redis refused the subscription
                (`RedisNoPermission` for an ACL that denies the channel). The interest
                is not counted.
        """
        link = self.subscriber
        if link is None:
            raise RedisUnavailable()
        count = self.wanted.get(channel, 0)
        waiters = self.confirmations.get(channel)
        if count == 0:
            self._send(link, _SUBSCRIBE, [channel])  # raises before anything is counted
            waiter: asyncio.Future[None] = link.loop.create_future()
            self.confirmations.setdefault(channel, collections.deque()).append(waiter)
        elif waiters:
            waiter = waiters[-1]
        else:
            self.wanted[channel] = count + 1
            return
        self.wanted[channel] = count + 1
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
        link = self.subscriber
        if link is not None:
            try:
                self._send(link, _UNSUBSCRIBE, [channel])
            except RedisUnavailable:
                # The connection is going: a new one subscribes only to what is wanted.
                link.abort("redis subscriber connection cannot take an UNSUBSCRIBE")

    def _send(self, link: Link, kind: bytes, channels: list[bytes]) -> None:
        link.send_quiet(kind.upper(), *channels)
        self._sent.append(_Sent(kind, collections.deque(channels)))
        link.awaiting_pushes += len(channels)

    def _ping(self, link: Link) -> None:
        # In pub/sub mode Redis answers PING with a ["pong", ""] push, in order.
        link.send_quiet(b"PING", health_check=True)
        self._sent.append(_Sent(_PONG, collections.deque([b""])))
        link.awaiting_pushes += 1

    # Replies on the subscriber connection

    def _on_push(self, replies: list[list[Any]]) -> None:
        messages = []
        for reply in replies:
            kind = reply[0]
            if kind == _MESSAGE:
                messages.append((reply[1], reply[2]))
            else:
                self._answered(kind, reply[1])
        if messages:
            self.on_messages(messages)

    def _answered(self, kind: bytes, channel: bytes) -> None:
        sent = self._sent[0] if self._sent else None
        if sent is None or sent.kind != kind or not sent.channels or sent.channels[0] != channel:
            logger.warning("redis confirmed %s %r out of order; ignored", kind, channel)
            return
        sent.channels.popleft()
        if self.subscriber is not None:
            self.subscriber.awaiting_pushes -= 1
        if not sent.channels:
            self._sent.popleft()
        if kind == _SUBSCRIBE:
            self._settle(channel, None)

    def _on_stray(self, reply: Any) -> None:
        if not isinstance(reply, RedisReplyError) or not self._sent:
            logger.warning("redis sent the subscriber a reply nothing asked for: %r", reply)
            return
        sent = self._sent.popleft()
        if self.subscriber is not None:
            self.subscriber.awaiting_pushes -= len(sent.channels)
        if sent.kind == _PONG:
            return  # a health check answered BUSY or LOADING: the link says so itself
        if reply.transient:
            # Redis refuses everyone for now: no channel is at fault.
            for channel in sent.channels:
                if sent.kind == _SUBSCRIBE:
                    self._settle(channel, reply)
            return
        if sent.kind == _SUBSCRIBE and len(sent.channels) > 1 and self.subscriber is not None:
            # One refused channel fails the whole command: find which, one by one.
            for channel in sent.channels:
                self._send(self.subscriber, _SUBSCRIBE, [channel])
            return
        for channel in sent.channels:
            logger.error(
                "redis refused %s %s: %s",
                sent.kind.decode().upper(),
                channel.decode(errors="replace"),
                reply,
            )
            if sent.kind == _SUBSCRIBE:
                self._settle(channel, reply)

    def _settle(self, channel: bytes, error: ServiceUnavailable | None) -> None:
        waiters = self.confirmations.get(channel)
        if not waiters:
            return
        waiter = waiters.popleft()
        if not waiters:
            del self.confirmations[channel]
        if waiter.done():
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)
            waiter.exception()  # its joiner may have left: never "never retrieved"

    # Connections

    def _on_lost(self, link: Link) -> None:
        if link is self.publisher:
            self.publisher = None
        elif link is self.subscriber:
            self.subscriber = None
            self._sent.clear()
            error = RedisUnavailable()
            for waiters in self.confirmations.values():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(error)
                        waiter.exception()
            self.confirmations.clear()
        else:
            return  # a link that failed while opening: _connect_missing() reports it
        if not self._closing:
            logger.warning("redis bus connection to %s lost; reconnecting", self.address)
            self._reconnecting = True
        self._set_state()
        self._wake.set()

    def _set_state(self) -> None:
        up = self.publisher is not None and self.subscriber is not None
        if up != self.up:
            self.up = up
            if self.on_state is not None:
                self.on_state(up)

    async def _monitor(self) -> None:
        period = tick(self.timeouts)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for link in (self.publisher, self.subscriber):
                if link is not None:
                    link.check(now)

    async def _reconnect(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            attempt = 0
            while not self._closing and (self.publisher is None or self.subscriber is None):
                await asyncio.sleep(self.timeouts.backoff(attempt))
                if await self._connect_missing():
                    logger.info("redis bus reconnected to %s", self.address)
                    if self._reconnecting:
                        counters.redis_reconnects += 1
                        self._reconnecting = False
                    attempt = 0
                else:
                    attempt += 1

    async def _connect_missing(self) -> bool:
        try:
            if self.publisher is None:
                publisher = await self._open(None)
                for script in self._scripts.values():  # ahead of any EVALSHA on it
                    publisher.send_unanswered(b"SCRIPT", b"LOAD", script)
                self.publisher = publisher
            if self.subscriber is None:
                await self._open_subscriber()
        except ServiceUnavailable as exc:
            logger.debug("redis bus cannot connect to %s: %r", self.address, exc)
            return False
        finally:
            self._set_state()
        return True

    async def _open_subscriber(self) -> None:
        """Open the subscriber and subscribe to every channel still wanted, confirmed.

        Raises:
            ServiceUnavailable: Redis did not confirm in time, or the link broke.
        """
        link = await self._open(self._on_push)
        if self.backlogs.name:
            try:
                async with asyncio.timeout(self.timeouts.socket):
                    # Named, so that every worker finds it in CLIENT LIST (and operators too).
                    await link.send(b"CLIENT", b"SETNAME", self.backlogs.name)
            except TimeoutError:
                link.abort("redis did not answer CLIENT SETNAME")
                raise RedisUnavailable() from None
            except RedisReplyError as exc:
                if exc.transient:
                    link.abort("redis could not name the bus's subscriber yet")
                    raise
                # An ACL without CLIENT: the bus works, only its backlog is not watched.
                logger.warning("redis refused CLIENT SETNAME: %s", exc)
        self._sent.clear()
        waiters = []
        for chunk in _chunks(list(self.wanted), _SUBSCRIBE_CHUNK):
            self._send(link, _SUBSCRIBE, chunk)
            for channel in chunk:
                waiter: asyncio.Future[None] = link.loop.create_future()
                self.confirmations.setdefault(channel, collections.deque()).append(waiter)
                waiters.append(waiter)
        # Until it is the subscriber, a loss must fail these waiters here.
        self.subscriber = link
        try:
            async with asyncio.timeout(self.timeouts.socket):
                results = await asyncio.gather(*waiters, return_exceptions=True)
        except TimeoutError:
            link.abort("redis did not confirm the bus's subscriptions")
            raise RedisUnavailable() from None
        refused = [result for result in results if isinstance(result, BaseException)]
        if refused and self.subscriber is None:
            raise RedisUnavailable()  # the connection was lost meanwhile
        if any(getattr(error, "transient", False) for error in refused):
            # Busy or loading: try the whole set again later rather than go up without it.
            link.abort("redis could not take the bus's subscriptions yet")
            raise RedisUnavailable()
        if refused:
            logger.error(
                "redis refused %d of the bus's %d subscriptions", len(refused), len(waiters)
            )

    async def _open(self, on_push: Callable[[list[list[Any]]], None] | None) -> Link:
        # Pub/sub ignores database numbers, so no SELECT.
        link = await open_link(
            self.address,
            self.timeouts,
            on_push=on_push,
            on_lost=self._on_lost,
            on_stray=self._on_stray if on_push is not None else None,
            push_kinds=_PUSH_KINDS,
            select_db=False,
        )
        if on_push is not None:
            link.on_ping = lambda: self._ping(link)
        return link


def _chunks(items: list[bytes], size: int) -> Iterable[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
