"""The bus against a real Redis: confirmed subscriptions, delivery, reconnects."""

from __future__ import annotations

import asyncio

import pytest

from shoal.core.bus import Bus
from shoal.core.errors import ServiceUnavailable
from shoal.core.resp import RedisAddress

from support import SCALE, RedisServer, eventually


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.states: list[bool] = []
        self.arrived = asyncio.Event()

    def on_messages(self, messages: list[tuple[bytes, bytes]]) -> None:
        self.messages.extend(messages)
        self.arrived.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5 * SCALE):
            while len(self.messages) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def test_subscribe_is_confirmed_then_every_message_arrives_in_order(
    redis_server: RedisServer,
) -> None:
    """subscribe() returns once Redis counts the subscriber; 1000 posts arrive in order."""
    inbox = Inbox()
    bus = Bus(RedisAddress.from_url(redis_server.url), inbox.on_messages, inbox.states.append)
    await bus.start()
    try:
        await bus.subscribe(b"t:a")
        # Confirmed: Redis counts the subscriber the moment subscribe() returns.
        assert redis_server.client().pubsub_numsub("t:a") == [("t:a", 1)]
        for n in range(1000):
            bus.post(b"t:a", str(n).encode())
        await inbox.wait_for(1000)
        assert [int(data) for _, data in inbox.messages] == list(range(1000))
        assert inbox.states == [True]
    finally:
        await bus.close()


async def test_subscriptions_are_counted(redis_server: RedisServer) -> None:
    """Two interests, one SUBSCRIBE; UNSUBSCRIBE only when the last interest goes."""
    inbox = Inbox()
    bus = Bus(RedisAddress.from_url(redis_server.url), inbox.on_messages)
    await bus.start()
    try:
        redis = redis_server.client()
        await asyncio.gather(bus.subscribe(b"t:b"), bus.subscribe(b"t:b"))
        bus.unsubscribe(b"t:b")
        bus.post(b"t:b", b"still")  # one interest is left
        await inbox.wait_for(1)
        assert redis.pubsub_numsub("t:b") == [("t:b", 1)]
        bus.unsubscribe(b"t:b")

        async def unsubscribed() -> bool:
            return bool(redis.pubsub_numsub("t:b") == [("t:b", 0)])

        await eventually(unsubscribed, 5, "the UNSUBSCRIBE to reach Redis")
        await bus.subscribe(b"t:marker")
        bus.post(b"t:b", b"gone")
        # Both PUBLISHes leave on the bus's one publisher connection, so Redis handles them
        # in order: had "gone" been delivered, it would arrive before the marker.
        bus.post(b"t:marker", b"after")
        await inbox.wait_for(2)
        assert inbox.messages == [(b"t:b", b"still"), (b"t:marker", b"after")]
    finally:
        await bus.close()


async def test_reconnects_and_resubscribes_after_redis_restarts(own_redis: RedisServer) -> None:
    """Down: posts and subscribes fail fast. Back: what is wanted is subscribed again."""
    inbox = Inbox()
    bus = Bus(RedisAddress.from_url(own_redis.url), inbox.on_messages, inbox.states.append)
    await bus.start()
    try:
        await bus.subscribe(b"t:c")
        own_redis.stop()
        async with asyncio.timeout(5 * SCALE):
            while bus.up:
                await asyncio.sleep(0.01)
        with pytest.raises(ServiceUnavailable):
            bus.post(b"t:c", b"lost")
        with pytest.raises(ServiceUnavailable):
            await bus.subscribe(b"t:d")
        await asyncio.to_thread(own_redis.start)
        async with asyncio.timeout(10 * SCALE):
            while not bus.up:
                await asyncio.sleep(0.01)
        # The resubscription goes out with the reconnect.
        redis = own_redis.client()
        async with asyncio.timeout(5 * SCALE):
            while redis.pubsub_numsub("t:c") != [("t:c", 1)]:
                await asyncio.sleep(0.02)
        bus.post(b"t:c", b"back")
        await inbox.wait_for(1)
        assert inbox.messages[0] == (b"t:c", b"back")
        assert inbox.states == [True, False, True]
        assert bus.wanted == {b"t:c": 1}  # the failed subscribe left no interest behind
    finally:
        await bus.close()


def test_addresses_from_urls() -> None:
    """Unix and TCP URLs, password and TLS, as the config gives them."""
    unix = RedisAddress.from_url("unix:///tmp/r.sock?db=2")
    assert unix.path == "/tmp/r.sock" and str(unix) == "unix:///tmp/r.sock"
    tcp = RedisAddress.from_url("redis://:secret@example:6380/1")
    assert (tcp.host, tcp.port, tcp.password, tcp.tls) == ("example", 6380, "secret", None)
    assert RedisAddress.from_url("rediss://example/0").tls is not None
