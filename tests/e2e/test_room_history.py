"""Room history and resume, spoken with plain websockets against a live two-worker
server: offsets, a replay racing live traffic, and the refusals that say why."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from support import Client, Shoal, clients_on_workers


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    rules = [{"rooms": "short.*", "size": 3, "ttl": 60}, {"rooms": "orders.*", "size": 1000}]
    return {**settings, "app": {"history": rules}}


async def say(c: Client, room: str, text: str) -> dict[str, Any]:
    """Send a room message; return its echo (with its offset)."""
    await c.send({"type": "room_message", "room": room, "message": text})
    while (echo := await c.recv())["type"] != "room_message":
        pass
    return echo


async def test_rooms_without_history_are_unchanged(shoal: Shoal) -> None:
    async with clients_on_workers(shoal, ["ann"], 1) as (ann,):
        joined = await ann.request({"type": "join_room", "room": "lobby"}, "joined_room")
        assert "offset" not in joined and "epoch" not in joined
        assert "offset" not in await say(ann, "lobby", "hi")


async def test_a_resume_racing_live_traffic_gets_each_message_once_in_order(
    shoal: Shoal,
) -> None:
    room = "orders.race"
    async with clients_on_workers(shoal, ["ann", "bo"]) as (ann, bo):
        joined = await ann.request({"type": "join_room", "room": room}, "joined_room")
        assert joined["offset"] == "0-0"
        epoch = joined["epoch"]
        first = await say(ann, room, "0")
        assert first["epoch"] == epoch

        async def publish() -> None:
            for n in range(1, 200):
                await ann.send({"type": "room_message", "room": room, "message": str(n)})
                await asyncio.sleep(0.002)

        sender = asyncio.create_task(publish())
        try:
            await asyncio.sleep(0.05)  # some messages are in the history before bo comes
            since = {"offset": first["offset"], "epoch": epoch}
            await bo.send({"type": "join_room", "room": room, "since": since})
            numbers: list[int] = []
            reply = None
            while len(numbers) < 199:
                message = await bo.recv(10)
                if message["type"] == "joined_room":
                    reply = message
                elif message["type"] == "room_message":
                    numbers.append(int(message["message"]))
        finally:
            await sender
    assert numbers == list(range(1, 200))  # each once, in order, replay and live alike
    assert reply is not None and reply["recovered"] is True and "reason" not in reply


async def test_a_client_that_cannot_be_caught_up_is_told_why(shoal: Shoal) -> None:
    async with clients_on_workers(shoal, ["ann", "bo", "cy"]) as (ann, bo, cy):
        await ann.request({"type": "join_room", "room": "short.1"}, "joined_room")
        # `size: 3` keeps about 3: Redis trims a stream by whole nodes of 100 entries.
        said = [await say(ann, "short.1", str(n)) for n in range(150)]
        epoch = said[0]["epoch"]

        since = {"offset": said[0]["offset"], "epoch": epoch}  # trimmed since
        refused = await bo.request({"type": "join_room", "room": "short.1", "since": since},
                                   "joined_room")  # fmt: skip
        assert refused["recovered"] is False and refused["reason"].startswith("offset too old")
        assert refused["offset"] == said[-1]["offset"] and refused["epoch"] == epoch
        await bo.request({"type": "leave_room", "room": "short.1"}, "left_room")

        lost = {"offset": said[-1]["offset"], "epoch": "0" * 16}
        refused = await bo.request({"type": "join_room", "room": "short.1", "since": lost},
                                   "joined_room")  # fmt: skip
        assert refused["recovered"] is False and refused["reason"].startswith("epoch changed")
        await bo.request({"type": "leave_room", "room": "short.1"}, "left_room")

        # From the last message ann said: what the room said since (bo's comings and
        # goings) is replayed, then the reply says it caught up.
        latest = {"offset": said[-1]["offset"], "epoch": epoch}
        await cy.send({"type": "join_room", "room": "short.1", "since": latest})
        replayed = []
        while (message := await cy.recv())["type"] != "joined_room":
            replayed.append((message["type"], message["user_id"]))
        assert message["recovered"] is True
        assert replayed == [("user_joined_room", "bo"), ("user_left_room", "bo")] * 2
        last = int(said[-1]["offset"].split("-")[0])
        assert message["offset"] == f"{last + 4}-0"  # four notices after ann's last

        bad = await bo.request({"type": "join_room", "room": "orders.x", "since": {"offset": 1}},
                               "error")  # fmt: skip
        assert "since" in bad["message"]
