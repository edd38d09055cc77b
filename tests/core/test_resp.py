"""The RESP connections against a real Redis and, where Redis cannot be made to misbehave
on cue, a real socket speaking RESP: error replies, stray replies, stalls, bounds."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis

from shoal.core.bus import Bus
from shoal.core.errors import (
    RedisBusy,
    RedisNoPermission,
    RedisOutOfMemory,
    RedisReplyError,
    RedisUnavailable,
)
from shoal.core.resp import Client, Link, RedisAddress, Timeouts, open_link

from support import SCALE, RedisServer, free_port

FAST = Timeouts(stall=0.2, socket=0.6, health_check=0.3, connect=1.0)


@contextlib.asynccontextmanager
async def fake_redis(
    on_data: Callable[[bytes, asyncio.StreamWriter], Awaitable[None]],
    greeting: bytes = b"",
) -> AsyncIterator[RedisAddress]:
    """A socket that speaks as much RESP as a test needs, for misbehaviour a real Redis
    cannot be made to show on cue (a reply nobody asked for, bytes that are not RESP)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await on_data(data, writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield RedisAddress.from_url(f"redis://127.0.0.1:{port}/0")


async def pong(data: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(b"+PONG\r\n" * data.count(b"PING"))


async def test_a_reply_nobody_asked_for_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: IndexError in data_received, and the connection was dropped."""

    async def pong_and_more(data: bytes, writer: asyncio.StreamWriter) -> None:
        # Each PING gets its PONG, then two replies nothing asked for.
        writer.write(b"+PONG\r\n:42\r\n-ERR nobody asked\r\n" * data.count(b"PING"))

    async with fake_redis(pong_and_more) as address:
        link = await open_link(address, FAST)
        try:
            async with asyncio.timeout(5 * SCALE):
                assert await link.send("PING") == b"PONG"
                assert await link.send("PING") == b"PONG"  # the strays did not shift replies
            assert link.transport is not None  # still connected
        finally:
            link.close()
    assert "redis sent a reply no command waits for" in caplog.text


async def test_bytes_that_are_not_resp_close_the_connection() -> None:
    async def garbage(data: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\x01 this is not RESP\r\n")

    async with fake_redis(garbage) as address:
        link = await open_link(address, FAST)
        with pytest.raises(RedisUnavailable):
            async with asyncio.timeout(5 * SCALE):
                await link.send("PING")
        assert link.transport is None


async def test_error_replies_become_shoal_errors(own_redis: RedisServer) -> None:
    address = RedisAddress.from_url(own_redis.url)
    admin = own_redis.client()
    client = Client(address, FAST)
    try:
        admin.config_set("maxmemory", 1)
        with pytest.raises(RedisOutOfMemory) as oom:
            await client.execute("SET", "k", "v")
        assert str(oom.value).startswith("OOM ") and oom.value.transient
        assert await client.execute("GET", "k") is None  # reads still work
        admin.config_set("maxmemory", 0)

        admin.acl_setuser(
            "limited", enabled=True, passwords=["+pw"], keys=["ok:*"], commands=["+@all"]
        )
        limited = Client(RedisAddress.from_url(f"redis://limited:pw@127.0.0.1:{own_redis.port}/0"))
        try:
            assert await limited.execute("SET", "ok:1", "v") == "OK"
            with pytest.raises(RedisNoPermission):
                await limited.execute("SET", "other", "v")
        finally:
            await limited.close()
        wrong = Client(RedisAddress.from_url(f"redis://limited:nope@127.0.0.1:{own_redis.port}/0"))
        with pytest.raises(RedisNoPermission):
            await wrong.execute("PING")
        await wrong.close()
    finally:
        await client.close()


async def test_busy_refuses_at_once_until_redis_answers_again(own_redis: RedisServer) -> None:
    admin = own_redis.client()
    admin.config_set("busy-reply-threshold", 50)
    client = Client(RedisAddress.from_url(own_redis.url), FAST)
    try:
        assert await client.execute("PING") == "PONG"
        script = (
            "local t = redis.call('TIME') local s = t[1] + t[2] / 1e6 while true do "
            "t = redis.call('TIME') if t[1] + t[2] / 1e6 - s > 1 then return 1 end end"
        )
        holder = threading.Thread(
            target=lambda: redis.Redis(port=own_redis.port, socket_timeout=10).eval(script, 0)
        )
        holder.start()
        await asyncio.sleep(0.2)  # the scenario: the script is past busy-reply-threshold
        with pytest.raises(RedisBusy):
            await client.execute("GET", "x")
        # Refused without a round trip while Redis is busy: the connection knows.
        with pytest.raises(RedisBusy):
            await client.execute("GET", "y")
        await asyncio.to_thread(holder.join, 10)
        async with asyncio.timeout(5 * SCALE):
            while True:  # health-check PINGs clear it once Redis answers normally
                with contextlib.suppress(RedisBusy):
                    assert await client.execute("GET", "x") is None
                    break
                await asyncio.sleep(0.05)
    finally:
        await client.close()


async def test_a_stalled_connection_refuses_new_commands_then_is_replaced(
    own_redis: RedisServer,
) -> None:
    client = Client(RedisAddress.from_url(own_redis.url), FAST)
    try:
        assert await client.execute("PING") == "PONG"
        own_redis.freeze()
        waiting = asyncio.ensure_future(client.execute("GET", "x"))
        async with asyncio.timeout(2 * SCALE):
            while True:  # within stall (0.2 s) and a monitor tick, new commands fail fast
                try:
                    await asyncio.wait_for(client.execute("GET", "y"), 0.05)
                except RedisUnavailable:
                    break
                except TimeoutError:
                    continue
        # The command that was waiting fails when the connection is given up (0.6 s).
        with pytest.raises(RedisUnavailable):
            async with asyncio.timeout(3 * SCALE):
                await waiting
        own_redis.thaw()
        async with asyncio.timeout(5 * SCALE):
            while True:
                with contextlib.suppress(RedisUnavailable):
                    assert await client.execute("PING") == "PONG"
                    break
                await asyncio.sleep(0.05)
    finally:
        own_redis.thaw()
        await client.close()


async def test_writes_queued_for_a_frozen_redis_are_bounded(own_redis: RedisServer) -> None:
    bounded = Timeouts(stall=30, socket=60, health_check=30, write_buffer=256 * 1024)
    link = await open_link(RedisAddress.from_url(own_redis.url), bounded)
    own_redis.freeze()
    try:
        payload = b"x" * 100_000

        async def flood() -> None:
            for _ in range(2_000):  # 200 MB: far past any socket buffer
                link.send_unanswered("PUBLISH", "c", payload)
                await asyncio.sleep(0)

        with pytest.raises(RedisUnavailable):
            await flood()
        assert link.transport is not None
        queued = link.transport.get_write_buffer_size()
        assert 256 * 1024 <= queued < 256 * 1024 + 2 * len(payload) + 1024
    finally:
        own_redis.thaw()
        link.abort("test over")


async def test_a_refused_channel_in_a_resubscription_fails_alone(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refuses a whole SUBSCRIBE for one denied channel; after a reconnect the bus
    resubscribes in chunks, and must not lose the other channels of the chunk."""
    admin = own_redis.client()
    admin.acl_setuser(
        "bus", enabled=True, passwords=["+pw"], commands=["+@all"], keys=["*"], channels=["t:*"]
    )
    received: list[tuple[bytes, bytes]] = []
    bus = Bus(
        RedisAddress.from_url(f"redis://bus:pw@127.0.0.1:{own_redis.port}/0"),
        received.extend,
        timeouts=FAST,
    )
    await bus.start()
    try:
        await bus.subscribe(b"t:a")
        await bus.subscribe(b"t:b")
        # The ACL changes under a running bus: t:b is no longer allowed.
        admin.acl_setuser("bus", enabled=True, channels=["t:a"], reset_channels=True)
        admin.client_kill_filter(user="bus")  # both connections drop; the bus reconnects
        async with asyncio.timeout(5 * SCALE):
            while not (bus.up and admin.pubsub_numsub("t:a") == [("t:a", 1)]):
                await asyncio.sleep(0.02)
        admin.publish("t:a", "still here")
        async with asyncio.timeout(5 * SCALE):
            while not received:
                await asyncio.sleep(0.02)
        assert received == [(b"t:a", b"still here")]
        assert "refused SUBSCRIBE t:b" in caplog.text
    finally:
        await bus.close()


def test_addresses_print_without_credentials() -> None:
    """Addresses print without credentials: they go into logs and error messages."""
    address = RedisAddress.from_url("redis://user:hunter2@db.internal:6380/3")
    assert str(address) == "redis://db.internal:6380/3"
    assert "hunter2" not in repr(str(address))
    assert str(RedisAddress.from_url(f"rediss://:pw@h:{free_port()}/0")).startswith("rediss://h:")


async def test_a_link_refuses_commands_once_closed(own_redis: RedisServer) -> None:
    link: Link = await open_link(RedisAddress.from_url(own_redis.url), FAST)
    link.close()
    await asyncio.sleep(0)  # connection_lost runs on the next loop turn
    async with asyncio.timeout(2 * SCALE):
        while link.transport is not None:
            await asyncio.sleep(0.01)
    with pytest.raises(RedisUnavailable):
        link.send("PING")


async def test_submit_gives_every_reply_or_the_first_error(own_redis: RedisServer) -> None:
    """`submit()`, the pipeline without a coroutine that registers connections."""
    client = Client(RedisAddress.from_url(own_redis.url), FAST)
    try:
        # Before any connection exists it connects, as `pipeline()` does.
        assert await client.submit([("SET", "a", "1"), ("INCR", "a"), ("GET", "a")]) == [
            "OK",
            2,
            "2",
        ]
        # An error reply in the middle fails the whole; the others still ran.
        with pytest.raises(RedisReplyError, match="WRONGTYPE"):
            await client.submit([("SET", "b", "x"), ("LPUSH", "b", "y"), ("SET", "c", "z")])
        assert await client.execute("GET", "c") == "z"
        # Redis gone with replies due: the future fails instead of hanging.
        own_redis.freeze()
        pending = client.submit([("GET", "a"), ("PING",)])
        own_redis.stop()
        with pytest.raises(RedisUnavailable):
            await asyncio.wait_for(pending, 5 * SCALE)
    finally:
        await client.close()
