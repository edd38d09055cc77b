"""The Emitter: any Python process reaches shoal's clients through Redis alone."""

from __future__ import annotations

import asyncio

from shoal.core.emitter import AsyncEmitter, Emitter

from support import RedisServer, Shoal, clients_on_workers


async def test_a_process_outside_shoal_reaches_rooms_users_and_everyone(
    shoal: Shoal, redis_server: RedisServer, prefix: str
) -> None:
    emitter = Emitter(redis_server.url, prefix)
    try:
        async with clients_on_workers(shoal, ["ann", "bo"]) as (ann, bo):
            for c in (ann, bo):
                await c.request({"type": "join_room", "room": "news"}, "joined_room")
            await ann.expect("user_joined_room")

            # From a Django view or a cron job: no event loop, no hub.
            assert await asyncio.to_thread(emitter.to_room("news").send, {"type": "n", "x": 1}) == 2
            for c in (ann, bo):
                assert await c.recv() == {"type": "n", "x": 1}

            assert await asyncio.to_thread(emitter.to_user("bo").send, {"type": "for_bo"}) == 1
            assert await bo.recv() == {"type": "for_bo"}
            await ann.silent()
            assert await asyncio.to_thread(emitter.to_user("nobody").send, {"type": "x"}) == 0

            await asyncio.to_thread(emitter.to_all().send, b"\x00binary")
            for c in (ann, bo):
                assert await c.ws.recv() == b"\x00binary"
            await asyncio.to_thread(emitter.to_channel("quiet").send, "nobody listens")
            await ann.silent()
    finally:
        emitter.close()


async def test_the_async_emitter(shoal: Shoal, redis_server: RedisServer, prefix: str) -> None:
    emitter = AsyncEmitter(redis_server.url, prefix)
    try:
        async with clients_on_workers(shoal, ["ann", "bo"]) as (ann, bo):
            await bo.request({"type": "subscribe", "channel": "prices"}, "subscribed")
            assert await emitter.to_channel("prices").send({"type": "price", "p": 3}) == 1
            assert await bo.recv() == {"type": "price", "p": 3}
            assert await emitter.to_user("ann").send("plain text") == 1
            assert await ann.ws.recv() == "plain text"
            await emitter.to_all().send({"type": "all"})
            for c in (ann, bo):
                assert await c.recv() == {"type": "all"}
    finally:
        await emitter.close()
