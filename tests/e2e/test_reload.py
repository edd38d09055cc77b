"""Rolling reloads, recycling and scaling, on real processes: SIGHUP, SIGUSR1, SIGUSR2,
SIGTTIN / SIGTTOU and `server.max_request`, with clients connected and connecting."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.exceptions import ConnectionClosed

from support import (
    SCALE,
    Client,
    Shoal,
    client,
    clients_on_workers,
    eventually,
    scrape,
    wait_until,
    workers_replaced,
)

GRACE = 2.0


@pytest.fixture
def node(tmp_path: Path, settings: dict[str, Any]) -> Any:
    settings["server"]["reload_grace"] = GRACE
    # The chatter sends as fast as its messages come back, faster than a chat client may.
    settings["limits"] = {"messages_per_second": None}
    node = Shoal(tmp_path, settings).start()
    yield node
    node.stop()


def rewrite(node: Shoal, change: dict[str, dict[str, Any]]) -> None:
    """Change the node's config file, section by section."""
    settings = yaml.safe_load(node.config_path.read_text())
    for section, values in change.items():
        settings.setdefault(section, {}).update(values)
    node.config_path.write_text(yaml.safe_dump(settings))


async def closed_with(c: Client) -> tuple[int | None, float]:
    """Read until the server closes; returns its close code and when it came."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await c.ws.recv()
    received = c.ws.protocol.close_rcvd
    return (received.code if received else None), time.monotonic()


class Tally:
    """What a background client saw: successes, and failures by description."""

    def __init__(self) -> None:
        self.ok = 0
        self.failures: list[str] = []


async def connect_loop(node: Shoal, stop: asyncio.Event, tally: Tally) -> None:
    """Connect, read the welcome and leave, over and over."""
    while not stop.is_set():
        try:
            async with client(node.url()):
                tally.ok += 1
        except Exception as exc:  # every way a handshake can fail counts
            tally.failures.append(repr(exc))


async def chatter(node: Shoal, stop: asyncio.Event, tally: Tally) -> None:
    """Send room messages and read each back, reconnecting (and rejoining) after a 1012:
    messages flowing through the reload. Anything but a 1012 close is a failure."""
    n = 0
    while not stop.is_set():
        try:
            async with client(node.url("talker")) as c:
                await c.request({"type": "join_room", "room": "flow"}, "joined_room")
                while not stop.is_set():
                    n += 1
                    await c.send({"type": "room_message", "room": "flow", "message": n})
                    assert (await c.expect("room_message"))["message"] == n
                    tally.ok += 1
        except ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code != 1012:
                tally.failures.append(repr(exc))
        except Exception as exc:
            tally.failures.append(repr(exc))


async def test_sighup_replaces_every_worker_under_traffic(node: Shoal) -> None:
    """Every worker is replaced, each old client is told 1012 within reload_grace (spread
    over it), messages keep flowing, and a client connecting in a loop is never refused
    or reset."""
    old = set(node.worker_pids())
    users = [f"u{n}" for n in range(12)]
    async with clients_on_workers(node, users) as clients:
        stop = asyncio.Event()
        connects, messages = Tally(), Tally()
        background = [
            asyncio.create_task(connect_loop(node, stop, connects)),
            asyncio.create_task(chatter(node, stop, messages)),
        ]
        await eventually(_both_running(connects, messages), 10, "connections and messages to flow")
        closes = [asyncio.create_task(closed_with(c)) for c in clients]
        hup = time.monotonic()
        node.signal(signal.SIGHUP)
        new = await asyncio.to_thread(
            wait_until, lambda: workers_replaced(node, old), 30, "new workers"
        )
        results = await asyncio.gather(*closes)
        await asyncio.to_thread(
            wait_until, lambda: "reload done" in node.log(), 10, "the reload to finish"
        )
        # Both go on against the new workers before they stop.
        after = connects.ok, messages.ok
        await eventually(_both_beyond(connects, messages, after), 10, "traffic on the new workers")
        stop.set()
        await asyncio.gather(*background)
    assert connects.failures == [], connects.failures[:5]
    assert messages.failures == [], messages.failures[:5]
    assert {code for code, _ in results} == {1012}
    by_worker: dict[str, list[float]] = {}
    for c, (_, at) in zip(clients, results, strict=True):
        by_worker.setdefault(c.worker, []).append(at)
    for times in by_worker.values():
        # Within the grace of its worker's retirement, and not all in one instant.
        assert max(times) - min(times) <= GRACE + 1 * SCALE
        assert max(times) - min(times) > GRACE / 10
    assert max(at for _, at in results) - hup < 2 * (GRACE + 5) * SCALE
    assert not new & old
    metrics = scrape(node)
    assert metrics["shoal_worker_restarts_total", "reload"] == 2
    assert metrics["shoal_worker_restarts_total", "crashed"] == 0
    assert metrics["shoal_reloads_total", "ok"] == 1
    assert metrics["shoal_reload_duration_seconds_count", ""] == 1


def _both_running(*tallies: Tally) -> Any:
    async def check() -> bool:
        return all(tally.ok >= 3 for tally in tallies)

    return check


def _both_beyond(connects: Tally, messages: Tally, counts: tuple[int, int]) -> Any:
    async def check() -> bool:
        return connects.ok > counts[0] + 3 and messages.ok > counts[1] + 3

    return check


async def test_sighup_applies_a_changed_config(node: Shoal) -> None:
    """New workers run with what the file now says (here, a smaller message limit)."""
    rewrite(node, {"server": {"max_message_size": 1000, "buffer_output_size": 2_097_152}})
    old = set(node.worker_pids())
    node.signal(signal.SIGHUP)
    await asyncio.to_thread(wait_until, lambda: workers_replaced(node, old), 30, "new workers")
    async with client(node.url()) as c:
        await c.ws.send("x" * 2000)
        code, _ = await closed_with(c)
    assert code == 1009


async def test_broken_config_changes_nothing(node: Shoal) -> None:
    old = set(node.worker_pids())
    node.config_path.write_text("server: {worker_num: -1}\n")
    node.signal(signal.SIGHUP)
    await asyncio.to_thread(
        wait_until,
        lambda: "the configuration is invalid; nothing changed" in node.log(),
        10,
        "the refusal",
    )
    assert "server.worker_num" in node.log()
    assert set(node.worker_pids()) == old
    assert scrape(node)["shoal_reloads_total", "failed"] == 1
    async with client(node.url()):
        pass


async def test_settings_that_cannot_change_keep_their_value(node: Shoal) -> None:
    """A new port or Redis is refused with one line each (never the Redis password); the
    rest of the reload goes on."""
    rewrite(
        node,
        {"server": {"port": node.port + 1}, "redis": {"url": "redis://:sekret@127.0.0.1:1/0"}},
    )
    old = set(node.worker_pids())
    node.signal(signal.SIGHUP)
    await asyncio.to_thread(wait_until, lambda: workers_replaced(node, old), 30, "new workers")
    log = node.log()
    assert log.count(f"server.port cannot change while shoal runs; keeping {node.port}") == 1
    assert log.count("redis.url cannot change while shoal runs; keeping the running") == 1
    assert "sekret" not in log
    async with client(node.url()):
        pass


async def test_sigusr1_reloads_without_reading_the_file(node: Shoal) -> None:
    rewrite(node, {"server": {"worker_num": 3}})
    old = set(node.worker_pids())
    node.signal(signal.SIGUSR1)
    await asyncio.to_thread(wait_until, lambda: workers_replaced(node, old), 30, "new workers")
    assert len(node.worker_pids()) == 2


async def test_reload_that_cannot_start_a_worker_is_aborted(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """The new code fails to import: the old workers keep serving, the node stays up."""
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "myapp.py").write_text("from shoal.core.app import App\n\napp = App()\n")
    settings["app"] = {"module": "myapp:app"}
    node = Shoal(tmp_path, settings).start(app_path=apps)
    try:
        old = set(node.worker_pids())
        (apps / "myapp.py").write_text("raise RuntimeError('broken deploy')\n")
        node.signal(signal.SIGHUP)
        await asyncio.to_thread(
            wait_until, lambda: "reload aborted" in node.log(), 30, "the reload to abort"
        )
        assert "RuntimeError('broken deploy')" in node.log()
        assert set(node.worker_pids()) == old
        assert node.process is not None and node.process.poll() is None
        assert (
            "died while starting: exit status 3; the one it was to replace serves on" in node.log()
        )
        async with client(node.url(), welcome=None):
            pass
    finally:
        node.stop()


async def test_sigttin_and_sigttou_add_and_remove_a_worker(node: Shoal) -> None:
    node.signal(signal.SIGTTIN)
    node.workers = 3
    await asyncio.to_thread(wait_until, lambda: node.health(expect_ok=True), 15, "3 workers")
    async with clients_on_workers(node, ["a", "b", "c"], workers=3) as clients:
        slot_2 = [c for c in clients if c.worker.split(".")[1] == "2"]
        assert slot_2
        closes = [asyncio.create_task(closed_with(c)) for c in slot_2]
        node.signal(signal.SIGTTOU)
        node.workers = 2
        await asyncio.to_thread(wait_until, lambda: len(node.worker_pids()) == 2, 15, "2 workers")
        assert {code for code, _ in await asyncio.gather(*closes)} == {1012}
    assert node.health(expect_ok=True) is not None
    assert scrape(node)["shoal_worker_restarts_total", "scale"] == 1


async def test_max_request_recycles_a_worker_replacement_first(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    settings["server"].update({"worker_num": 1, "max_request": 20, "reload_grace": 0})
    node = Shoal(tmp_path, settings).start()
    try:
        (old,) = node.worker_pids()
        async with client(node.url("a")) as c:
            for _ in range(25):
                await c.request({"type": "presence"}, "presence")
            code, _ = await closed_with(c)
        assert code == 1012
        await asyncio.to_thread(
            wait_until, lambda: workers_replaced(node, {old}), 15, "a new worker"
        )
        assert "(server.max_request); asking to be replaced" in node.log()
        assert scrape(node)["shoal_worker_restarts_total", "max_request"] == 1
        async with client(node.url("b")):
            pass
    finally:
        node.stop()


async def test_sigusr2_replaces_the_task_pool(tmp_path: Path, settings: dict[str, Any]) -> None:
    settings["tasks"] = {"task_worker_num": 1}
    node = Shoal(tmp_path, settings).start()
    try:
        pool = node.task_pool_pid()
        workers = set(node.worker_pids())
        node.signal(signal.SIGUSR2)
        await asyncio.to_thread(
            wait_until, lambda: node.task_pool_pid() not in (None, pool), 15, "a new task pool"
        )
        assert set(node.worker_pids()) == workers
        async with client(node.url("a")) as c:
            dispatched = await c.request(
                {"type": "task", "task": "noop", "data": {}}, "task_dispatched"
            )
            result = await c.expect("task_result", timeout=15)
        assert result["task_id"] == dispatched["task_id"]
    finally:
        node.stop()
