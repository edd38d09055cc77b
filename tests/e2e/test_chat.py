"""The chat protocol end to end: a real 2-worker shoal, a real Redis, plain websockets clients."""

from __future__ import annotations

import asyncio
from typing import Any

from support import Shoal, client, clients_on_workers, eventually, join, wait_until


async def test_welcome_and_clients_on_both_workers(shoal: Shoal) -> None:
    """Each client is welcomed with its ids; the helper spreads clients over both workers."""
    async with clients_on_workers(shoal, ["ann", "bo"]) as (ann, bo):
        assert ann.welcome == {
            "type": "welcome",
            "user_id": "ann",
            "connection_id": ann.connection_id,
        }
        assert ann.worker != bo.worker
        assert shoal.health()["connections"] == 2  # type: ignore[index]


async def test_generated_user_id_when_none_given(shoal: Shoal) -> None:
    """Without a user_id, each connection gets a distinct generated one."""
    async with client(shoal.url()) as anon, client(shoal.url()) as other:
        assert anon.user_id.startswith("u-") and anon.user_id != other.user_id


async def test_room_across_workers(shoal: Shoal) -> None:
    """Join, message, leave: members on either worker see it all, others nothing."""
    async with clients_on_workers(shoal, ["ann", "bo", "cy"]) as (ann, bo, cy):
        joined = await ann.request({"type": "join_room", "room": "lobby"}, "joined_room")
        assert joined == {
            "type": "joined_room",
            "room": "lobby",
            "members": ["ann"],
            "total_members": 1,
        }
        joined = await bo.request({"type": "join_room", "room": "lobby"}, "joined_room")
        assert sorted(joined["members"]) == ["ann", "bo"]
        assert await ann.expect("user_joined_room") == {
            "type": "user_joined_room",
            "user_id": "bo",
            "room": "lobby",
            "total_members": 2,
        }

        await bo.send({"type": "room_message", "room": "lobby", "message": {"text": "hi"}})
        for member in (ann, bo):  # the sender included
            got = await member.expect("room_message")
            assert got["from"] == "bo" and got["room"] == "lobby"
            assert got["message"] == {"text": "hi"} and isinstance(got["timestamp"], int)
        await cy.silent()  # not a member: nothing comes within the wait

        error = await cy.request({"type": "room_message", "room": "lobby", "message": "x"}, "error")
        assert error == {"type": "error", "message": "Not in room"}

        left = await bo.request({"type": "leave_room", "room": "lobby"}, "left_room")
        assert left == {"type": "left_room", "room": "lobby"}
        assert await ann.expect("user_left_room") == {
            "type": "user_left_room",
            "user_id": "bo",
            "room": "lobby",
            "total_members": 1,
        }
        await bo.send({"type": "room_message", "room": "lobby", "message": "gone"})
        assert (await bo.expect("error"))["message"] == "Not in room"


async def test_room_errors(shoal: Shoal) -> None:
    """Missing, invalid and unknown rooms are answered with their error."""
    async with client(shoal.url("ann")) as ann:
        assert await ann.request({"type": "join_room"}, "error") == {
            "type": "error",
            "message": "Missing room",
        }
        assert (await ann.request({"type": "join_room", "room": 7}, "error"))["message"] == (
            "Invalid room"
        )
        assert (await ann.request({"type": "leave_room", "room": "nowhere"}, "error"))[
            "message"
        ] == "Not in room"


async def test_empty_room_is_deleted(shoal: Shoal, redis_server: Any, prefix: str) -> None:
    """The last member leaving removes the room's key from Redis."""
    async with client(shoal.url("ann")) as ann:
        await ann.request({"type": "join_room", "room": "solo"}, "joined_room")
        assert redis_server.client().exists(f"{prefix}:room:solo")
        await ann.request({"type": "leave_room", "room": "solo"}, "left_room")
        assert not redis_server.client().exists(f"{prefix}:room:solo")


async def test_broadcast_reaches_every_other_connection(shoal: Shoal) -> None:
    """A broadcast reaches every connection on every worker but the sender's."""
    async with clients_on_workers(shoal, ["ann", "bo", "cy"]) as (ann, bo, cy):
        await ann.send({"type": "broadcast", "message": "hello all"})
        for other in (bo, cy):
            got = await other.expect("broadcast")
            assert got["from"] == "ann" and got["message"] == "hello all"
        await ann.silent()  # the sender is left out: nothing comes within the wait


async def test_private_reaches_every_connection_of_the_user(shoal: Shoal) -> None:
    """A private message reaches each of the user's connections; the sender gets a receipt."""
    async with clients_on_workers(shoal, ["ann", "bo", "bo"]) as (ann, bo1, bo2):
        await ann.send({"type": "private", "to": "bo", "message": "psst"})
        sent = await ann.expect("message_sent")
        assert sent["to"] == "bo"
        for conn in (bo1, bo2):
            got = await conn.expect("private_message")
            assert got == {
                "type": "private_message",
                "from": "ann",
                "message": "psst",
                "timestamp": sent["timestamp"],
            }
        error = await ann.request({"type": "private", "to": "nobody", "message": "x"}, "error")
        assert error == {"type": "error", "message": "User not found"}


async def test_channels(shoal: Shoal) -> None:
    """Channels deliver to subscribers only, announce nothing, and stop at unsubscribe."""
    async with clients_on_workers(shoal, ["ann", "bo", "cy"]) as (ann, bo, cy):
        assert await ann.request({"type": "subscribe", "channel": "news"}, "subscribed") == {
            "type": "subscribed",
            "channel": "news",
        }
        await bo.request({"type": "subscribe", "channel": "news"}, "subscribed")
        await ann.silent()  # channels announce no joins

        await cy.send({"type": "publish", "channel": "news", "message": "extra!"})
        for subscriber in (ann, bo):
            got = await subscriber.expect("message")
            assert got["channel"] == "news" and got["from"] == "cy" and got["message"] == "extra!"
        await cy.silent()  # publishing does not subscribe: nothing comes within the wait

        await bo.request({"type": "unsubscribe", "channel": "news"}, "unsubscribed")
        await cy.send({"type": "publish", "channel": "news", "message": "again"})
        assert (await ann.expect("message"))["message"] == "again"
        await bo.silent()  # unsubscribed: nothing comes within the wait
        assert (await bo.request({"type": "unsubscribe", "channel": "news"}, "error"))[
            "message"
        ] == "Not subscribed"


async def test_presence_and_metadata_across_workers(shoal: Shoal) -> None:
    """Metadata merges; presence lists users of both workers, or of one room."""
    async with clients_on_workers(shoal, ["ann", "bo"]) as (ann, bo):
        await ann.request({"type": "join_room", "room": "r1"}, "joined_room")
        updated = await bo.request(
            {"type": "set_metadata", "metadata": {"status": "away"}}, "metadata_updated"
        )
        assert updated["metadata"] == {"status": "away"}
        updated = await bo.request(
            {"type": "set_metadata", "metadata": {"mood": "ok"}}, "metadata_updated"
        )
        assert updated["metadata"] == {"status": "away", "mood": "ok"}

        everyone = await ann.request({"type": "presence"}, "presence")
        assert everyone["users"] == [
            {"user_id": "ann", "rooms": ["r1"], "metadata": {}},
            {"user_id": "bo", "rooms": [], "metadata": {"status": "away", "mood": "ok"}},
        ]
        room = await bo.request({"type": "presence", "room": "r1"}, "presence")
        assert room["users"] == [{"user_id": "ann", "rooms": ["r1"], "metadata": {}}]
        assert (await bo.request({"type": "set_metadata", "metadata": [1]}, "error"))[
            "message"
        ] == "Invalid metadata"


async def test_bad_input_gets_an_error_and_the_connection_stays(shoal: Shoal) -> None:
    """Bad JSON is answered with an error; unknown types echo; binary echoes back."""
    async with client(shoal.url("ann")) as ann, client(shoal.url("bo")) as bo:
        await bo.request({"type": "join_room", "room": "r"}, "joined_room")
        for bad in ["not json", "[1, 2]", '{"no": "type"}', '{"type": 5}', "{"]:
            await ann.ws.send(bad)
            assert await ann.recv() == {"type": "error", "message": "Invalid message format"}
        echoed = await ann.request({"type": "whatever", "n": [1, {"a": None}]}, "echo")
        assert echoed["data"] == {"type": "whatever", "n": [1, {"a": None}]}
        await ann.ws.send(b"\x00\xffbinary")
        assert await ann.ws.recv() == b"\x00\xffbinary"
        # Nothing else was disturbed.
        await bo.send({"type": "room_message", "room": "r", "message": "still here"})
        assert (await bo.expect("room_message"))["message"] == "still here"


async def test_close_leaves_rooms_and_notifies(
    shoal: Shoal, redis_server: Any, prefix: str
) -> None:
    """A closed connection leaves its rooms: members are told, Redis forgets it."""
    async with clients_on_workers(shoal, ["ann", "bo"]) as (ann, bo):
        await join("r", ann, bo)
        await bo.ws.close()
        assert await ann.expect("user_left_room") == {
            "type": "user_left_room",
            "user_id": "bo",
            "room": "r",
            "total_members": 1,
        }
        redis = redis_server.client()

        async def bo_is_gone() -> bool:
            # The notice may go out before the removal of bo's own keys has finished.
            return bool(
                redis.hvals(f"{prefix}:room:r") == ["ann"]
                and not redis.exists(f"{prefix}:user:bo")
                and redis.hkeys(f"{prefix}:users") == ["ann"]
            )

        await eventually(bo_is_gone, 5, "bo's state to be removed from Redis")


async def test_announce_connections(
    tmp_path: Any, settings: dict[str, Any], redis_server: Any
) -> None:
    """With announce_connections, users (not connections) coming and going are announced."""
    settings["app"] = {"module": "chat", "announce_connections": True}
    node = Shoal(tmp_path, settings).start()
    try:
        async with client(node.url("ann")) as ann:
            async with client(node.url("bo")):
                assert await ann.expect("user_connected") == {
                    "type": "user_connected",
                    "user_id": "bo",
                    "total_users": 2,
                }
                async with client(node.url("bo")):  # bo's second connection
                    assert (await ann.expect("user_connected"))["total_users"] == 2
                # bo is still connected once: still two users
                assert (await ann.expect("user_disconnected"))["total_users"] == 2
                # Counts are read as closes happen: let the first close finish first.
                redis = redis_server.client()
                key = f"{settings['redis']['prefix']}:user:bo"
                await asyncio.to_thread(wait_until, lambda: redis.hlen(key) == 1, 5, "bo's close")
            assert await ann.expect("user_disconnected") == {
                "type": "user_disconnected",
                "user_id": "bo",
                "total_users": 1,
            }
    finally:
        node.stop()
