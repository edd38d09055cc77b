"""`shoal status`, `shoal reload` and `shoal stop` against a real node, and the open-files
limit the master raises for its workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import SCALE, SHOAL, Shoal, client, eventually, wait_until


@pytest.fixture
def pid_file(tmp_path: Path) -> Path:
    return tmp_path / "run" / "shoal.pid"


@pytest.fixture
def node(tmp_path: Path, settings: dict[str, Any], pid_file: Path) -> Iterator[Shoal]:
    settings["server"]["pid_file"] = str(pid_file)
    node = Shoal(tmp_path, settings).start()
    yield node
    node.stop()


def shoal(node: Shoal, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a `shoal` command with the node's config file, which names its pid file."""
    return subprocess.run(
        [*SHOAL, *args, "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=60 * SCALE,
    )


def settled(node: Shoal) -> dict[str, Any]:
    """The node's status once it is running with every worker serving."""

    def probe() -> dict[str, Any] | None:
        out = shoal(node, "status", "--json")
        if out.returncode != 0:
            return None
        data: dict[str, Any] = json.loads(out.stdout)
        serving = [w for w in data["workers"] if w["state"] == "serving"]
        ready = data["state"] == "running" and len(serving) == len(data["workers"])
        return data if ready and len(serving) == node.workers else None

    result: dict[str, Any] = wait_until(probe, 15, "shoal status to show every worker serving")
    return result


def test_status_lists_every_worker(node: Shoal, pid_file: Path) -> None:
    data = settled(node)
    assert pid_file.read_text() == f"{node.pid}\n"
    assert data["pid"] == node.pid
    assert data["listen"] == f"ws://127.0.0.1:{node.port}/ws"
    assert sorted(w["pid"] for w in data["workers"]) == sorted(node.worker_pids())
    assert sorted(w["slot"] for w in data["workers"]) == list(range(node.workers))
    assert data["housekeeper"]["pid"] == node.housekeeper_pid()
    assert data["task_pool"] is None
    assert data["redis"]["embedded"] is False and data["redis"]["up"] is True
    assert data["stale"] is False and data["reloads"] == 0
    table = shoal(node, "status")
    assert table.returncode == 0, table.stderr
    for pid in node.worker_pids():
        assert f" {pid} " in table.stdout


def test_reload_replaces_the_workers(node: Shoal) -> None:
    before = {w["pid"] for w in settled(node)["workers"]}
    assert before == set(node.worker_pids())
    out = shoal(node, "reload", "--timeout", str(30 * SCALE))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("reloaded in ")
    after = settled(node)
    assert after["reloads"] == 1 and after["last_reload"]["ok"] is True
    new = {w["pid"] for w in after["workers"]}
    assert not new & before
    wait_until(lambda: set(node.worker_pids()) == new, 10, "the old workers to exit")


def test_stop_stops_the_master(node: Shoal, pid_file: Path) -> None:
    settled(node)
    out = shoal(node, "stop")
    assert out.returncode == 0, out.stderr
    assert node.wait(5) == 0
    assert not pid_file.exists()
    after = shoal(node, "status")
    assert after.returncode == 1
    assert f"no pid file at {pid_file}" in after.stderr


def test_a_second_master_refuses_the_pid_file_of_a_running_one(
    node: Shoal, tmp_path: Path, settings: dict[str, Any]
) -> None:
    """Another port, the same pid file: the second master stops before it starts anything."""
    settled(node)
    second = Shoal(tmp_path / "second", settings).start(wait=False)
    try:
        assert second.wait(15) == 1
    finally:
        second.stop()
    assert f"names pid {node.pid}, a running shoal master" in second.log()
    assert settled(node)["pid"] == node.pid


@contextlib.contextmanager
def open_files(soft: int) -> Iterator[None]:
    """Raise this process's soft open-files limit for a while."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))


CLIENTS = 1500
_, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)


@pytest.mark.skipif(
    HARD != resource.RLIM_INFINITY and HARD < CLIENTS + 1100,
    reason=f"the hard open-files limit here ({HARD}) is too low for {CLIENTS} clients",
)
async def test_one_worker_serves_more_clients_than_its_soft_limit(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """Started with a soft limit of 1024, the master raises it: one worker takes 1,500
    clients."""
    settings["server"]["worker_num"] = 1
    node = Shoal(tmp_path, settings).start(nofile=1024)
    try:
        with open_files(CLIENTS + 1000 if HARD == resource.RLIM_INFINITY else HARD):
            async with contextlib.AsyncExitStack() as stack:
                for first in range(0, CLIENTS, 100):
                    batch = [
                        stack.enter_async_context(client(node.url(f"u{n}")))
                        for n in range(first, first + 100)
                    ]
                    await asyncio.gather(*batch)

                async def all_counted() -> bool:
                    health = await asyncio.to_thread(node.health)
                    return health is not None and health["connections"] == CLIENTS

                await eventually(all_counted, 10, f"/healthz to count {CLIENTS} connections")
    finally:
        node.stop()
    assert "Too many open files" not in node.log()
