"""The master as users drive it: the `shoal` command in a subprocess, signals, kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from support import SCALE, SHOAL, RedisServer, Shoal, client, clients_on_workers, join, wait_until


def test_version() -> None:
    """`shoal --version` prints the version."""
    out = subprocess.run([*SHOAL, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("shoal 0.")


async def test_sigterm_closes_clients_with_1001_and_removes_state(
    shoal: Shoal, redis_server: RedisServer, prefix: str
) -> None:
    """SIGTERM: clients get 1001, Redis is left clean, the master exits 0 in time."""
    async with clients_on_workers(shoal, ["ann", "bo"]) as (ann, bo):
        await ann.request({"type": "join_room", "room": "r"}, "joined_room")
        assert redis_server.client().keys(f"{prefix}:*")
        started = time.monotonic()
        shoal.signal(signal.SIGTERM)
        for c in (ann, bo):
            with pytest.raises(ConnectionClosed):
                await c.recv(timeout=10)
            assert c.ws.close_code == 1001
        code = await asyncio.to_thread(shoal.wait, 10)
    assert code == 0
    # Within server.shutdown_timeout (10 s), and without the SIGKILL that ends it.
    assert time.monotonic() - started < 10 * SCALE
    assert "sending SIGKILL" not in shoal.log()
    assert redis_server.client().keys(f"{prefix}:*") == []
    assert "stopped" in shoal.log()


async def test_sigint_stops_like_sigterm(
    shoal: Shoal, redis_server: RedisServer, prefix: str
) -> None:
    """SIGINT (Ctrl-C) is a graceful stop too."""
    async with client(shoal.url("ann")) as ann:
        shoal.signal(signal.SIGINT)
        with pytest.raises(ConnectionClosed):
            await ann.recv(timeout=10)
        assert ann.ws.close_code == 1001
    assert await asyncio.to_thread(shoal.wait, 10) == 0
    assert redis_server.client().keys(f"{prefix}:*") == []


async def test_kill_9_of_a_worker_respawns_it_and_leaves_no_ghosts(
    shoal: Shoal,
    redis_server: RedisServer,
    prefix: str,
    record_property: Callable[[str, object], None],
) -> None:
    """A worker killed with SIGKILL is respawned; its connections' state is removed.
    (A fork and an import: well under a second on an idle machine, seconds on a busy one
    under coverage; `respawn_seconds` records it.)"""
    redis = redis_server.client()
    async with clients_on_workers(shoal, ["ann", "bo"]) as (ann, bo):
        await join("r", ann, bo)
        victim = int(bo.connection_id.split(".")[2])
        assert victim in shoal.worker_pids()
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        # bo's connection dies with its worker; the master respawns one at once.
        with pytest.raises(ConnectionClosed):
            await bo.recv(timeout=5)
        wait_until(
            lambda: len(shoal.worker_pids()) == 2 and victim not in shoal.worker_pids(),
            5,
            "the worker to be respawned",
        )
        record_property("respawn_seconds", round(time.monotonic() - killed_at, 2))

        def no_ghosts() -> bool:
            return (
                redis.hvals(f"{prefix}:room:r") == ["ann"]
                and not redis.exists(f"{prefix}:user:bo")
                and redis.hkeys(f"{prefix}:users") == ["ann"]
                and not redis.exists(f"{prefix}:conn:{bo.connection_id}")
            )

        wait_until(no_ghosts, 10, "the dead worker's state to be removed")
        # Its room is told, as for any close.
        assert await ann.expect("user_left_room") == {
            "type": "user_left_room",
            "user_id": "bo",
            "room": "r",
            "total_members": 1,
        }
        everyone = await ann.request({"type": "presence"}, "presence")
        assert [u["user_id"] for u in everyone["users"]] == ["ann"]
        wait_until(lambda: shoal.health(expect_ok=True), 5, "both workers up again")

        # The survivor's own state was left alone, and the new worker serves.
        async with client(shoal.url("cy")) as cy:
            await cy.request({"type": "join_room", "room": "r"}, "joined_room")
            assert (await ann.expect("user_joined_room"))["user_id"] == "cy"
    assert "died: signal SIGKILL; respawning" in shoal.log()


async def test_kill_9_of_a_whole_node_is_swept_by_another(
    tmp_path: Path, settings: dict[str, Any], redis_server: RedisServer, prefix: str
) -> None:
    """A node killed whole is swept by another node once its heartbeats expire."""
    redis = redis_server.client()
    doomed = Shoal(tmp_path / "doomed", settings)
    survivor = Shoal(tmp_path / "survivor", settings)
    try:
        doomed.start()
        survivor.start()
        async with client(survivor.url("ann")) as ann:
            await ann.request({"type": "join_room", "room": "r"}, "joined_room")
            async with client(doomed.url("bo")) as bo:
                await bo.request({"type": "join_room", "room": "r"}, "joined_room")
                await ann.expect("user_joined_room")
                # The whole node at once: master and workers, no chance to clean up.
                for pid in [doomed.pid, *doomed.child_pids()]:
                    os.kill(pid, signal.SIGKILL)
                doomed.wait(5)
            # heartbeat_ttl is 3 s in these tests; sweeps run every ttl/2, and each dead
            # worker is swept once its own heartbeat has been missing long enough: the
            # two may go in different sweeps.
            wait_until(
                lambda: (
                    redis.hvals(f"{prefix}:room:r") == ["ann"]
                    and len(redis.hkeys(f"{prefix}:workers")) == 2  # the survivor's two
                ),
                3 * 3,
                "the dead node's workers and connections to be swept",
            )
            assert redis.hkeys(f"{prefix}:users") == ["ann"]
            assert "swept state of dead workers" in survivor.log()
            left = await ann.expect("user_left_room")
            assert (left["user_id"], left["room"], left["total_members"]) == ("bo", "r", 1)
    finally:
        survivor.stop()
        doomed.stop()


def test_bad_config_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    """serve and check-config refuse a bad config with status 2, naming every bad key."""
    config = tmp_path / "bad.yaml"
    config.write_text("server:\n  worker_num: 0\n  colour: blue\nredis:\n  prefix: 'a:b'\n")
    for command in (["serve", "--config", str(config)], ["check-config", str(config)]):
        started = time.monotonic()
        out = subprocess.run([*SHOAL, *command], capture_output=True, text=True, timeout=30 * SCALE)
        assert out.returncode == 2
        assert "server.worker_num: Input should be greater than 0" in out.stderr
        assert "server.colour: unknown key" in out.stderr
        assert "redis.prefix:" in out.stderr
        assert time.monotonic() - started < 10 * SCALE  # refused before starting anything


def test_check_config_prints_the_resolved_config(tmp_path: Path) -> None:
    """check-config prints file, environment and defaults merged."""
    config = tmp_path / "ok.yaml"
    config.write_text("server:\n  port: 9999\napp:\n  announce_connections: true\n")
    out = subprocess.run(
        [*SHOAL, "check-config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "SHOAL_SERVER__WORKER_NUM": "3"},
    )
    assert "port: 9999" in out.stdout and "worker_num: 3" in out.stdout
    assert "announce_connections: true" in out.stdout and "max_connection: 100000" in out.stdout


def test_bad_app_stops_instead_of_respawning(tmp_path: Path, settings: dict[str, Any]) -> None:
    """An app that fails at import stops the node with status 1 instead of a respawn loop."""
    (tmp_path / "brokenapp.py").write_text("raise RuntimeError('boom at import')\n")
    settings["app"] = {"module": "brokenapp:app"}
    node = Shoal(tmp_path, settings)
    try:
        node.start(wait=False, app_path=tmp_path)
        assert node.wait(15) == 1
    finally:
        node.stop()
    log = node.log()
    assert "boom at import" in log and "could not start" in log
    # Said by the worker(s) that tried: at most once per worker, so no respawn loop.
    assert 1 <= log.count("cannot start") <= 2


def test_missing_app_module_is_a_config_error(tmp_path: Path) -> None:
    """An app module that does not exist is a config error (status 2), found before forking."""
    out = subprocess.run(
        [*SHOAL, "serve", "--app", "no.such.module:app"],
        capture_output=True,
        text=True,
        timeout=30 * SCALE,
    )
    assert out.returncode == 2
    assert "app.module: no module named 'no.such.module'" in out.stderr


def test_port_taken_is_a_clear_error(tmp_path: Path, settings: dict[str, Any]) -> None:
    """A port in use stops the node with status 1 and says so."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        settings["server"]["port"] = squatter.getsockname()[1]
        node = Shoal(tmp_path, settings).start(wait=False)
        assert node.wait(15) == 1
    assert "server.port: cannot listen on 127.0.0.1" in node.log()
    assert "Address already in use" in node.log()


def test_missing_redis_server_binary_is_a_clear_error(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """A missing redis-server binary stops the node and says how to install one."""
    settings["redis"] = {"url": "embedded", "server_bin": "no-such-redis-server"}
    node = Shoal(tmp_path, settings).start(wait=False)
    assert node.wait(15) == 1
    assert "'no-such-redis-server' is not on PATH" in node.log()
    assert "apt-get install redis-server" in node.log()


def test_unreachable_redis_is_a_clear_error(tmp_path: Path, settings: dict[str, Any]) -> None:
    """A Redis that cannot be reached at start stops the node, naming redis.url."""
    settings["redis"]["url"] = "redis://127.0.0.1:1/0"
    node = Shoal(tmp_path, settings).start(wait=False)
    assert node.wait(15) == 1
    assert "redis.url: cannot connect to redis://127.0.0.1:1/0" in node.log()


def test_one_listener_per_worker(shoal: Shoal) -> None:
    """Each worker accepts on its own SO_REUSEPORT listener, which the master keeps open
    (so that a reload or a respawn does not reset what its queue holds)."""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{shoal.port}"], capture_output=True, text=True, check=True
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    holders = [{int(part.split(",")[0]) for part in line.split("pid=")[1:]} for line in lines]
    workers = set(shoal.worker_pids())
    for pids in holders:
        assert shoal.pid in pids
        assert len(pids & workers) == 1
    assert set.union(*holders) - {shoal.pid} == workers


async def test_embedded_redis_by_default(tmp_path: Path) -> None:
    """What the README's first command runs: no Redis configured at all."""
    node = Shoal(tmp_path, {"server": {"worker_num": 2}})
    node.start()
    try:
        async with clients_on_workers(node, ["ann", "bo"]) as (ann, bo):
            await ann.send({"type": "private", "to": "bo", "message": "hi"})
            assert (await bo.expect("private_message"))["message"] == "hi"
        redis_pid = node.redis_pid()
    finally:
        node.stop()
    assert node.process is not None and node.process.returncode == 0
    assert not Path(f"/proc/{redis_pid}").exists()


async def test_one_worker_node_tells_rooms_once_its_worker_is_back(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """Departures of a one-worker node's dead worker are told once the worker is back."""
    settings["server"]["worker_num"] = 1
    node = Shoal(tmp_path, settings)
    other = Shoal(tmp_path / "other", settings)
    try:
        node.start()
        other.start()
        async with client(other.url("ann")) as ann, client(node.url("bo")) as bo:
            await join("r", ann, bo)
            os.kill(node.worker_pids()[0], signal.SIGKILL)
            # The node's only worker is gone; the notice waits for the new one.
            left = await ann.expect("user_left_room", timeout=10)
            assert (left["user_id"], left["total_members"]) == ("bo", 1)
    finally:
        node.stop()
        other.stop()
