"""A user's own application, loaded through app.module, written on the App API."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from support import SCALE, Shoal, client, clients_on_workers

APP = textwrap.dedent(
    """
    from typing import Any

    from shoal.core import protocol
    from shoal.core.app import App, Connection
    from shoal.core.errors import ProtocolError

    app = App()


    @app.on_open
    async def hello(conn: Connection) -> None:
        if conn.user_id == "refused":
            raise ProtocolError("Not welcome")
        if conn.user_id == "buggy":
            raise RuntimeError("a bug in on_open")
        await conn.send({"type": "hello", "user_id": conn.user_id, "connection_id": conn.id,
                         "greeting": app.settings["greeting"]})


    @app.on("shout")
    async def shout(conn: Connection, message: dict[str, Any]) -> None:
        text = message.get("text")
        if not isinstance(text, str):
            raise ProtocolError("Invalid text")
        await conn.hub.broadcast({"type": "shout", "from": conn.user_id, "text": text})


    @app.on("join")
    async def join(conn: Connection, message: dict[str, Any]) -> None:
        room = protocol.name_field(message, "room")
        members = await conn.join(room)
        await conn.send({"type": "joined", "members": members})
        await conn.hub.publish(room, {"type": "arrived", "user_id": conn.user_id}, exclude=conn)


    @app.on("crash")
    async def crash(conn: Connection, message: dict[str, Any]) -> None:
        raise RuntimeError("a bug in the handler")
    """
)


@pytest.fixture
def custom_app(tmp_path: Path, settings: dict[str, Any]) -> Iterator[Shoal]:
    (tmp_path / "myapp.py").write_text(APP)
    settings["app"] = {"module": "myapp:app", "greeting": "ahoy"}
    node = Shoal(tmp_path, settings)
    try:
        yield node.start(app_path=tmp_path)
    finally:
        node.stop()


async def test_custom_app_on_the_app_api(custom_app: Shoal) -> None:
    """on_open, on(type), broadcast, join and publish of a user's app, across two workers;
    handler errors are answered and the connection lives on."""
    async with clients_on_workers(custom_app, ["ann", "bo"], welcome="hello") as (ann, bo):
        assert ann.welcome["greeting"] == "ahoy" and ann.user_id == "ann"
        await ann.send({"type": "shout", "text": "hey"})
        for c in (ann, bo):  # on both workers, the sender included
            assert await c.expect("shout") == {"type": "shout", "from": "ann", "text": "hey"}
        assert await ann.request({"type": "shout", "text": 1}, "error") == {
            "type": "error",
            "message": "Invalid text",
        }
        await ann.request({"type": "join", "room": "r"}, "joined")
        assert (await bo.request({"type": "join", "room": "r"}, "joined"))["members"] == [
            "ann",
            "bo",
        ]
        assert await ann.expect("arrived") == {"type": "arrived", "user_id": "bo"}
        # A bug in a handler: logged, answered, and the connection lives on.
        assert await ann.request({"type": "crash"}, "error") == {
            "type": "error",
            "message": "Internal error",
        }
        assert (await ann.request({"type": "nope"}, "error"))["message"] == "Unknown message type"
        await ann.ws.send(b"\x01")
        assert (await ann.expect("error"))["message"] == "Binary frames are not supported"
    log = custom_app.log()
    assert "handler failed" in log and "a bug in the handler" in log


@pytest.mark.parametrize(
    ("user", "code", "reason"),
    [("refused", 1008, "Not welcome"), ("buggy", 1011, "internal error")],
)
async def test_on_open_failing_closes_that_connection_alone(
    custom_app: Shoal, user: str, code: int, reason: str
) -> None:
    """on_open raising ProtocolError closes with 1008 and its message; a bug in it with
    1011, logged. Nothing but the close reaches that client; the others go on."""
    async with clients_on_workers(custom_app, ["ann", "bo"], welcome="hello") as (ann, _):
        async with connect(custom_app.url(user), open_timeout=5 * SCALE) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5 * SCALE)
            assert (ws.close_code, ws.close_reason) == (code, reason)
        await ann.send({"type": "shout", "text": "still here"})
        assert (await ann.expect("shout"))["text"] == "still here"
    if user == "buggy":
        assert "on_open failed" in custom_app.log() and "a bug in on_open" in custom_app.log()


async def test_json_logs(tmp_path: Path, settings: dict[str, Any]) -> None:
    """With log.format json, every line of every process is one JSON object."""
    settings["log"] = {"level": "info", "format": "json"}
    node = Shoal(tmp_path, settings)
    try:
        node.start()
        async with client(node.url("ann")):
            pass
    finally:
        node.stop()
    lines = [json.loads(line) for line in node.log().splitlines()]
    assert {line["role"] for line in lines} >= {"master", "worker 0", "worker 1"}
    assert all({"time", "level", "pid", "logger", "message"} <= set(line) for line in lines)
    assert any("stopped" in line["message"] for line in lines)


def test_invalid_chat_settings_stop_the_node_naming_the_key(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    settings["app"] = {"joined_members_limit": "ten"}
    node = Shoal(tmp_path, settings).start(wait=False)
    assert node.wait(15) == 1
    assert "app.joined_members_limit: must be an integer ≥ 0, not 'ten'" in node.log()


SLOW_APP = """
import asyncio
from shoal.core.app import App

app = App()


@app.on("slow")
async def slow(conn, message):
    await asyncio.sleep(float(message["seconds"]))
    await conn.send({"type": "done"})
"""


async def test_a_client_whose_handler_waits_is_not_closed_as_idle(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """The keepalive closes clients that say nothing; one whose handler is still waiting
    (for Redis under backpressure, say) is silent because of the server, not itself."""
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    settings["app"] = {"module": "slowapp:app"}
    settings["server"].update(heartbeat_check_interval=0.5, heartbeat_idle_time=1.5)
    node = Shoal(tmp_path, settings).start(app_path=tmp_path)
    try:
        async with client(node.url("ann"), welcome=None) as ann:
            # The first handler waits 4 s; what follows fills the connection's inbox, so
            # the server stops reading it, its pongs included (`Sessions`).
            await ann.send({"type": "slow", "seconds": 4})
            for _ in range(80):
                await ann.send({"type": "slow", "seconds": 0})
            for _ in range(81):  # all answered: not closed with 4001 meanwhile
                assert (await ann.recv(10))["type"] == "done"
    finally:
        node.stop()
