"""Plain HTTP on the WebSocket port, and health while Redis comes and goes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from support import (
    FAST_REDIS,
    SCALE,
    RedisServer,
    Shoal,
    client,
    clients_on_workers,
    eventually,
    join,
    wait_until,
)


def raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, return the status code and the whole response."""
    with socket.create_connection(("127.0.0.1", port), timeout=5 * SCALE) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_healthz_on_the_public_port_answers_status_only(shoal: Shoal) -> None:
    """The public /healthz says ok, once, and nothing about the node; the admin listener
    has the details."""
    status, data = raw_http(shoal.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.count(b"Content-Type") == 1 and b"Content-Type: application/json" in head
    assert json.loads(body) == {"status": "ok"}
    assert raw_http(shoal.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404

    assert shoal.admin_port is not None
    status, data = raw_http(shoal.admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    health = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert health["workers_alive"] == 2 and health["worker_num"] == 2
    assert health["redis"] is True and health["connections"] == 0
    assert health["node"] and health["worker"] and health["status"] == "ok"


def test_the_admin_listener_serves_no_websocket(shoal: Shoal) -> None:
    assert shoal.admin_port is not None
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert raw_http(shoal.admin_port, upgrade)[0] == 404
    assert raw_http(shoal.admin_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404


def test_without_admin_port_there_is_no_admin_listener(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    node = Shoal(tmp_path, {**settings, "server": {"admin_port": None}})
    node.start(wait=False)
    try:
        ok = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        wait_until(lambda: _answers(node.port, ok), 15, "the public /healthz")
        # Nothing else of the node listens: its workers hold the public port only.
        for pid in node.worker_pids():
            listening = subprocess.run(
                ["ss", "-Hltnp"], capture_output=True, text=True, check=True
            ).stdout
            ports = {
                int(line.split()[3].rsplit(":", 1)[1])
                for line in listening.splitlines()
                if f"pid={pid}," in line
            }
            assert ports == {node.port}
    finally:
        node.stop()


def _answers(port: int, request: bytes) -> bool:
    try:
        return raw_http(port, request)[0] == 200
    except OSError:
        return False


def test_plain_http_and_bad_upgrades(shoal: Shoal) -> None:
    """Other paths 404, /ws without upgrade 426, bad handshakes 400, garbage no traceback."""
    port = shoal.port
    upgrade = (
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    assert raw_http(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404
    assert raw_http(port, b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404
    assert raw_http(port, b"GET /other HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n")[0] == 404
    # The WebSocket path without an upgrade: 426 Upgrade Required, as RFC 6455 asks.
    assert raw_http(port, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 426
    missing_key = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    status, data = raw_http(port, missing_key)
    assert status == 400 and b"Traceback" not in data
    bad_version = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 7\r\n\r\n"
    )
    assert raw_http(port, bad_version)[0] == 400
    # Garbage gets no traceback, and the server is unharmed.
    with socket.create_connection(("127.0.0.1", port), timeout=5 * SCALE) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert b"Traceback" not in sock.recv(65536)
    assert shoal.health(expect_ok=True)
    assert "Traceback" not in shoal.log()


async def test_requests_with_bodies_are_plain_http_and_websockets_serve_on(shoal: Shoal) -> None:
    """A request that cannot be a handshake (not a GET) is served as plain HTTP: nothing
    answers it yet, so 405 and the connection closes; WebSockets work on the same port."""
    body = b'{"name":"x","channels":["a"],"data":"{}"}'
    post = (
        b"POST /apps/1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    assert shoal.admin_port is not None
    for port in (shoal.port, shoal.admin_port):
        status, data = raw_http(port, post)  # read until the server closes
        head, answer = data.split(b"\r\n\r\n", 1)
        assert status == 405 and b"\r\nallow: GET\r\n" in head
        assert json.loads(answer) == {"error": "method not allowed"}
        assert raw_http(port, b"DELETE /ws HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 405
    async with client(shoal.url("ann")) as ann:
        assert (await ann.request({"type": "ping"}, "echo"))["data"] == {"type": "ping"}
    assert shoal.health(expect_ok=True)
    assert "Traceback" not in shoal.log()


async def test_max_connection_gives_503(tmp_path: Path, settings: dict[str, Any]) -> None:
    """Past max_connection, a handshake gets HTTP 503; a freed place admits again."""
    settings["server"]["max_connection"] = 2
    node = Shoal(tmp_path, settings).start()
    try:
        async with client(node.url("a")), client(node.url("b")):
            upgrade = (
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            status, data = raw_http(node.port, upgrade)
            assert status == 503 and b"max_connection" in data

        async def released() -> bool:
            return (node.health() or {}).get("connections") == 0

        await eventually(released, 5, "both connections to leave the count")
        async with client(node.url("c")):  # room again once they left
            pass
    finally:
        node.stop()


async def test_redis_outage_is_reported_and_survived(
    tmp_path: Path, settings: dict[str, Any], own_redis: RedisServer, prefix: str
) -> None:
    """While Redis is down /healthz says 503 and clients get errors; then all recovers."""
    settings["redis"]["url"] = own_redis.url
    node = Shoal(tmp_path, settings).start()
    try:
        async with clients_on_workers(node, ["ann", "bo"]) as (ann, bo):
            await join("r", ann, bo)

            own_redis.stop()
            wait_until(
                lambda: (node.health() or {}).get("http_status") == 503,
                10,
                "/healthz to report the outage",
            )
            assert node.health()["redis"] is False  # type: ignore[index]
            # Clients stay connected and get a clear error for what needs Redis.
            error = await ann.request(
                {"type": "room_message", "room": "r", "message": "x"}, "error"
            )
            assert error == {"type": "error", "message": "Service unavailable"}
            echoed = await ann.request({"type": "ping", "n": 1}, "echo")
            assert echoed["data"] == {"type": "ping", "n": 1}

            # Redis comes back empty: the workers reconnect and write their state back.
            own_redis.start()
            wait_until(lambda: node.health(expect_ok=True), 15, "/healthz to recover")
            redis = own_redis.client()
            wait_until(
                lambda: sorted(redis.hvals(f"{prefix}:room:r")) == ["ann", "bo"],
                10,
                "room state to be written back",
            )
            await ann.send({"type": "room_message", "room": "r", "message": "back"})
            for c in (ann, bo):
                assert (await c.expect("room_message"))["message"] == "back"
            presence = await bo.request({"type": "presence"}, "presence")
            assert [u["user_id"] for u in presence["users"]] == ["ann", "bo"]
        log = node.log()
        assert "lost; reconnecting" in log and "reconnected" in log and "Traceback" not in log
    finally:
        node.stop()


async def test_embedded_redis_that_dies_is_restarted(tmp_path: Path) -> None:
    """The master restarts a killed embedded Redis; workers write their state back."""
    node = Shoal(tmp_path, {"server": {"worker_num": 2}, "redis": FAST_REDIS})
    node.start()
    try:
        async with clients_on_workers(node, ["ann", "bo"]) as (ann, bo):
            await join("r", ann, bo)
            redis_pid = node.redis_pid()
            os.kill(redis_pid, signal.SIGKILL)
            wait_until(lambda: redis_pid not in node.child_pids(), 5, "redis to die")
            # The master starts a new one; the workers reconnect and write their state back.
            wait_until(lambda: node.health(expect_ok=True), 15, "/healthz to recover")

            async def presence() -> list[str]:
                await bo.send({"type": "presence", "room": "r"})
                # ann's own join notice may reach bo late, after bo joined, when ann's
                # worker was slow to publish it (a known race of the chat app's notices).
                while (reply := await bo.recv())["type"] == "user_joined_room":
                    assert reply["user_id"] == "ann"
                assert reply["type"] == "presence", reply
                return [u["user_id"] for u in reply["users"]]

            async def both_present() -> bool:
                return await presence() == ["ann", "bo"]

            await eventually(both_present, 10, "ann and bo to be written back to the room")
            await ann.send({"type": "room_message", "room": "r", "message": "still here"})
            for c in (ann, bo):
                assert (await c.expect("room_message"))["message"] == "still here"
        assert f"embedded redis (pid {redis_pid}) died: signal SIGKILL; respawning" in node.log()
    finally:
        node.stop()
