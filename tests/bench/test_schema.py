"""The bench's messages are the schema's: what it sends, and what its own servers answer.

The frames the drivers pre-build are pinned byte for byte (the bench measures servers, so
its wire format must not drift) and validated with `shoal.core.schema`. The null server and
the websockets peer are driven by a plain `websockets` client, not the bench's, and every
message they send must pass `schema.check_server_message`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from shoal.bench.client import server_type
from shoal.bench.drivers import check_templates, echo_template, stream_template, task_template
from shoal.bench.nullserver import start_null_server
from shoal.bench.plan import SCENARIOS, RunPlan
from shoal.core import schema

from support import SCALE

Peer = Any  # conftest.Peer: has .url and .pid


def _plan(scenario: str, *, raw: bool = False, room: str = "lobby") -> RunPlan:
    return RunPlan(
        scenario, "ws://127.0.0.1:1/ws", 4, 1, size=2, raw=raw, room=room, user_prefix="u"
    )


_PAYLOAD = b'{"src":0,"seq":7,"ts":9,"pad":"xx"}'


@pytest.mark.parametrize(
    ("scenario", "wire"),
    [
        ("fanout", b'{"type":"room_message","room":"lobby","message":' + _PAYLOAD + b"}"),
        ("broadcast", b'{"type":"broadcast","message":' + _PAYLOAD + b"}"),
        ("private", b'{"type":"private","to":"u-1","message":' + _PAYLOAD + b"}"),
    ],
)
def test_stream_frames_are_schema_messages(scenario: str, wire: bytes) -> None:
    frame = stream_template(_plan(scenario), 0) % (0, 7, 9)
    assert frame == wire
    schema.check_client_message(orjson.loads(frame))


def test_echo_probes_keep_their_wire_format() -> None:
    assert echo_template(_plan("echo")) % (0, 7, 9) == b'{"type":"bench",' + _PAYLOAD[1:]
    assert echo_template(_plan("echo", raw=True)) % (0, 7, 9) == _PAYLOAD


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_templates_pass_the_set_up_check(scenario: str) -> None:
    check_templates(_plan(scenario))
    if scenario == "echo":
        check_templates(_plan(scenario, raw=True))


def test_task_jobs_are_schema_messages() -> None:
    noop = task_template(_plan("task")) % (0, 7, 9)
    assert noop == b'{"type":"task","task":"noop","data":' + _PAYLOAD + b"}"
    plan = RunPlan("task", "ws://127.0.0.1:1/ws", 4, 1, size=3, task="process_data")
    crunch = orjson.loads(task_template(plan))
    assert crunch == {"type": "task", "task": "process_data", "data": {"numbers": [0, 1, 2]}}
    check_templates(plan)


def test_names_are_json_not_format_directives() -> None:
    plan = _plan("fanout", room='50% "off"')
    check_templates(plan)
    message = orjson.loads(stream_template(plan, 0) % (0, 7, 9))
    assert message["room"] == '50% "off"'


def test_server_type_names_every_server_message() -> None:
    assert server_type(schema.Welcome) == "welcome"
    for name, kind in schema.SERVER_TYPES.items():
        assert server_type(kind) == name


# Every server of the bench answers with the schema's messages ------------------------------


async def _receive(ws: ClientConnection, seen: list[str]) -> str:
    """Receive one message within 5 s, check it against the schema, note its type."""
    async with asyncio.timeout(5 * SCALE):
        message = orjson.loads(await ws.recv())
    schema.check_server_message(message)
    seen.append(message["type"])
    return str(message["type"])


async def _recv_until(ws: ClientConnection, kind: str, seen: list[str]) -> None:
    """Receive, checking each message against the schema, up to one of type `kind`."""
    while await _receive(ws, seen) != kind:
        pass


async def _send(ws: ClientConnection, message: schema.ClientMessage | dict[str, Any]) -> None:
    await ws.send(orjson.dumps(message), text=True)


async def _converse(url: str) -> None:
    """Users a and b exchange every kind of message the bench uses; each must receive at
    least its set below, 5 s at most between messages, each checked against the schema."""
    seen_a: list[str] = []
    seen_b: list[str] = []
    async with connect(f"{url}?user_id=a") as a, connect(f"{url}?user_id=b") as b:
        await _recv_until(a, "welcome", seen_a)
        await _recv_until(b, "welcome", seen_b)
        for ws, seen in ((a, seen_a), (b, seen_b)):
            await _send(ws, {"type": "join_room", "room": "r"})
            await _recv_until(ws, "joined_room", seen)
        await _send(a, {"type": "room_message", "room": "r", "message": {"n": 1}})
        await _send(a, {"type": "broadcast", "message": {"n": 2}})
        await _send(a, {"type": "private", "to": "b", "message": {"n": 3}})
        await _send(a, {"type": "bench", "n": 4})  # a type no handler claims: echoed
        # A server may route rooms, broadcasts and users through separate Redis channels
        # (Channels' groups): their messages may arrive in any order.
        for ws, seen, wanted in ((a, seen_a, _FOR_A), (b, seen_b, _FOR_B)):
            while not set(seen) >= wanted:
                await _receive(ws, seen)


# What a and b must have received, at least (the peer also tells a that b joined).
_FOR_A = {"welcome", "joined_room", "room_message", "message_sent", "echo"}
_FOR_B = {"welcome", "joined_room", "room_message", "broadcast", "private_message"}


async def test_null_server_sends_schema_messages() -> None:
    url, proc = start_null_server(raw=False)
    try:
        await _converse(url)
    finally:
        proc.terminate()
        proc.join(10 * SCALE)


async def test_websockets_peer_sends_schema_messages(start_peer: Callable[..., Peer]) -> None:
    peer = start_peer()
    await _converse(peer.url)
    async with connect(f"{peer.url}?user_id=c") as c:
        seen: list[str] = []
        await _recv_until(c, "welcome", seen)
        await c.send("not json")
        await _recv_until(c, "error", seen)
        await _send(c, {"type": "private", "to": "nobody", "message": 1})
        await _recv_until(c, "error", seen)


async def test_channels_peer_sends_schema_messages(tmp_path: Path) -> None:
    """The Django Channels peer: its own Redis as a child, the schema's messages."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.bench.peers.channels_peer", "--port", str(port)],
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30 * SCALE):
            while True:
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                await asyncio.sleep(0.1)
        await _converse(f"ws://127.0.0.1:{port}/ws")
        redis_children = subprocess.run(
            ["pgrep", "-P", str(proc.pid), "redis-server"], capture_output=True, text=True
        ).stdout.split()
        assert len(redis_children) == 1  # Redis is counted as the server's own
    finally:
        proc.terminate()
        proc.wait(15 * SCALE)
    assert proc.returncode in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    async with asyncio.timeout(5 * SCALE):  # its Redis goes with it
        while Path(f"/proc/{redis_children[0]}").exists():
            await asyncio.sleep(0.05)
