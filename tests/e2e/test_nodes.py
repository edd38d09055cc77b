"""Two nodes (two `shoal serve` on different ports) on one Redis behave as one server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support import Shoal, client


async def test_rooms_broadcast_private_and_presence_span_nodes(nodes: tuple[Shoal, Shoal]) -> None:
    """Rooms, broadcast, channels, private messages and presence work across nodes."""
    a, b = nodes
    async with client(a.url("ann")) as ann, client(b.url("bo")) as bo, client(b.url("cy")) as cy:
        assert ann.connection_id.split(".")[0] != bo.connection_id.split(".")[0]  # node ids

        await ann.request({"type": "join_room", "room": "r"}, "joined_room")
        joined = await bo.request({"type": "join_room", "room": "r"}, "joined_room")
        assert sorted(joined["members"]) == ["ann", "bo"]
        assert (await ann.expect("user_joined_room"))["total_members"] == 2
        await ann.send({"type": "room_message", "room": "r", "message": "across"})
        for member in (ann, bo):
            assert (await member.expect("room_message"))["message"] == "across"
        await cy.silent()  # not a member: nothing comes within the wait

        await bo.send({"type": "broadcast", "message": "to all"})
        for other in (ann, cy):
            assert (await other.expect("broadcast"))["from"] == "bo"

        await cy.request({"type": "subscribe", "channel": "c"}, "subscribed")
        await ann.send({"type": "publish", "channel": "c", "message": "chan"})
        assert (await cy.expect("message"))["message"] == "chan"

        await cy.send({"type": "private", "to": "ann", "message": "hi ann"})
        await cy.expect("message_sent")
        assert (await ann.expect("private_message"))["from"] == "cy"

        presence = await ann.request({"type": "presence"}, "presence")
        assert [u["user_id"] for u in presence["users"]] == ["ann", "bo", "cy"]
        assert a.health()["node"] != b.health()["node"]  # type: ignore[index]


async def test_prefixes_keep_deployments_apart(tmp_path: Path, settings: dict[str, Any]) -> None:
    """Two deployments on one Redis with different prefixes see nothing of each other."""
    other = {
        **settings,
        "redis": {**settings["redis"], "prefix": settings["redis"]["prefix"] + "x"},
    }
    a = Shoal(tmp_path / "a", settings)
    b = Shoal(tmp_path / "b", other)
    try:
        a.start()
        b.start()
        async with client(a.url("ann")) as ann, client(b.url("bo")) as bo:
            await ann.request({"type": "join_room", "room": "r"}, "joined_room")
            joined = await bo.request({"type": "join_room", "room": "r"}, "joined_room")
            assert joined["members"] == ["bo"]
            await bo.send({"type": "broadcast", "message": "only mine"})
            await ann.silent()  # another deployment's broadcast never comes
            error = await ann.request({"type": "private", "to": "bo", "message": "x"}, "error")
            assert error["message"] == "User not found"
            presence = await bo.request({"type": "presence"}, "presence")
            assert [u["user_id"] for u in presence["users"]] == ["bo"]
    finally:
        a.stop()
        b.stop()
