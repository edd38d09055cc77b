"""Input meant to hurt others: deep nesting and oversized metadata are refused with a
clear error, and `presence` keeps working for everyone (plain websockets clients)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from support import Shoal, clients_on_workers, join

DEEP = 300  # deeper than the encoder writes back (254): once broke presence for everyone
TOO_LARGE = "Metadata too large: at most 1000 bytes as JSON"


@pytest.fixture
def small_metadata(settings: dict[str, Any]) -> dict[str, Any]:
    settings["limits"] = {"max_metadata_bytes": 1000}
    return settings


async def test_deep_nesting_is_refused_and_presence_keeps_working(shoal: Shoal) -> None:
    async with clients_on_workers(shoal, ["mallory", "ann"]) as (mallory, ann):
        await join("lobby", mallory, ann)
        deep: Any = {}
        for _ in range(DEEP):
            deep = {"a": deep}
        for message in (
            {"type": "set_metadata", "metadata": deep},
            {"type": "room_message", "room": "lobby", "message": deep},
            {"type": "set_metadata", "metadata": _nest(70)},
        ):
            await mallory.ws.send(json.dumps(message))
            error = await mallory.expect("error")
            assert error["message"] == "Message nested too deeply: at most 64 levels"
        # Within the limit, accepted and written back, also inside a presence reply.
        ok = await mallory.request(
            {"type": "set_metadata", "metadata": _nest(60)}, "metadata_updated"
        )
        assert ok["metadata"] == _nest(60)
        for member in (ann, mallory):
            reply = await member.request({"type": "presence", "room": "lobby"}, "presence")
            assert {u["user_id"] for u in reply["users"]} == {"mallory", "ann"}
        await ann.silent(0.2)  # nothing reached the room
    assert "Traceback" not in shoal.log()


def _nest(levels: int) -> dict[str, Any]:
    """Metadata that makes a `set_metadata` message `levels` + 1 levels deep."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


async def test_oversized_metadata_is_refused_and_changes_nothing(
    tmp_path: Path, small_metadata: dict[str, Any]
) -> None:
    node = Shoal(tmp_path, small_metadata).start()
    try:
        async with clients_on_workers(node, ["mallory", "ann"]) as (mallory, ann):
            await mallory.request(
                {"type": "set_metadata", "metadata": {"status": "here"}}, "metadata_updated"
            )
            error = await mallory.request(
                {"type": "set_metadata", "metadata": {"blob": "x" * 2000}}, "error"
            )
            assert error["message"] == TOO_LARGE
            # Small merges add up to the same bound: each is 100 bytes more.
            refused_at = None
            for n in range(20):
                await mallory.send({"type": "set_metadata", "metadata": {f"k{n:02d}": "y" * 90}})
                answer = await mallory.recv()
                if answer["type"] == "error":
                    assert answer["message"] == TOO_LARGE
                    refused_at = n
                    break
                assert answer["type"] == "metadata_updated"
            assert refused_at is not None and 5 <= refused_at <= 10
            # What was refused is not kept: everyone sees the last accepted metadata.
            presence = await ann.request({"type": "presence"}, "presence")
            (entry,) = [u for u in presence["users"] if u["user_id"] == "mallory"]
            assert entry["metadata"]["status"] == "here"
            assert len(entry["metadata"]) == refused_at + 1
            assert len(json.dumps(entry["metadata"], separators=(",", ":"))) <= 1000
    finally:
        node.stop()
