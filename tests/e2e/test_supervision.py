"""The master as a supervisor of process kinds: stuck workers, crash loops, the
housekeeper, orphans when shoal is PID 1, and admission across the node's workers."""

from __future__ import annotations

import asyncio
import contextlib
import http
import os
import re
import signal
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from support import SCALE, Shoal, client, clients_on_workers, join, wait_until

STUCK_APP = """
import time

from shoal.core.app import App

app = App()


@app.on("block")
async def block_the_loop(conn, message):
    time.sleep(60)  # a handler that blocks its worker's event loop
"""

# Crashes (not a boot failure: any status but 3) in the worker of one slot, or in all.
CRASHING_APP = """
import os

import setproctitle

from shoal.core.app import App

if setproctitle.getproctitle() in {titles!r}:
    os._exit(7)

app = App()
"""

ORPHAN_APP = """
import os
import time

from shoal.core.app import App

app = App()


@app.on("orphan")
async def orphan(conn, message):
    # Double fork: the grandchild outlives its parent, so it is handed to PID 1.
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            time.sleep(0.5)
        os._exit(0)
    os.waitpid(child, 0)
    await conn.send({"type": "orphaned"})
"""


def test_a_stuck_worker_is_aborted_with_its_traceback(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """SIGABRT first, so the log shows where the loop was stuck; SIGKILL only after.

    Before: SIGKILL at once, and nothing in the log said what the worker was doing.
    """
    (tmp_path / "stuckapp.py").write_text(STUCK_APP)
    settings["app"] = {"module": "stuckapp:app"}
    settings["server"].update(worker_num=1, worker_timeout=2)
    node = Shoal(tmp_path, settings).start(app_path=tmp_path)
    try:

        async def block() -> None:
            async with client(node.url("ann"), welcome=None) as ann:
                await ann.send({"type": "block"})
                with contextlib.suppress(Exception):
                    await ann.recv(timeout=10)

        (victim,) = node.worker_pids()
        asyncio.run(block())
        wait_until(lambda: "died: signal SIGABRT; respawning" in node.log(), 10, "the abort")
        wait_until(lambda: node.health(expect_ok=True), 10, "a new worker")
        assert victim not in node.worker_pids()
        log = node.log()
        assert "silent for" in log and "sending SIGABRT" in log
        assert "Fatal Python error: Aborted" in log
        assert re.search(r'File ".*stuckapp\.py", line \d+ in block_the_loop', log), log
        assert "SIGKILL" not in log  # the abort was enough
    finally:
        node.stop()


def test_a_crash_looping_worker_backs_off_while_the_others_serve(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """Before: with two or more workers, the boot-failure count was reset on every tick
    while any worker was up, so a crash-looping slot respawned forever without pause."""
    (tmp_path / "crashapp.py").write_text(CRASHING_APP.format(titles={"shoal: worker 1"}))
    settings["app"] = {"module": "crashapp:app"}
    node = Shoal(tmp_path, settings).start(wait=False, app_path=tmp_path)
    try:

        def delays() -> list[float]:
            return [float(d) for d in re.findall(r"respawning in ([\d.]+) s", node.log())]

        # Delays double from 0.5 s (with jitter in [0.5, 1] of that): 1 s comes soon.
        wait_until(lambda: any(d >= 1.0 for d in delays()), 15, "a backoff of a second")
        assert node.log().count("worker 1 (pid") <= 8
        health = node.health()
        assert health is not None and health["http_status"] == 200
        assert health["workers_alive"] == 1
        assert node.process is not None and node.process.poll() is None
    finally:
        node.stop()


def test_workers_that_all_crash_while_starting_stop_the_node(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    (tmp_path / "crashall.py").write_text(
        CRASHING_APP.format(titles={"shoal: worker 0", "shoal: worker 1"})
    )
    settings["app"] = {"module": "crashall:app"}
    node = Shoal(tmp_path, settings).start(wait=False, app_path=tmp_path)
    assert node.wait(30) == 1
    log = node.log()
    assert "every worker died while starting, 5 times in a row" in log
    assert "(crash loop)" in log


async def test_the_housekeeper_is_respawned_and_does_its_work(shoal: Shoal, prefix: str) -> None:
    victim = shoal.housekeeper_pid()
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: "housekeeper (pid" in shoal.log() and _housekeeper_back(shoal, victim),
        3,
        "a new housekeeper",
    )
    # The new one cleans up after a dead worker as the old one would have.
    async with clients_on_workers(shoal, ["ann", "bo"]) as (ann, bo):
        await join("r", ann, bo)
        os.kill(int(bo.connection_id.split(".")[2]), signal.SIGKILL)
        left = await ann.expect("user_left_room", timeout=5)
        assert left["user_id"] == "bo"
    assert f"housekeeper (pid {victim}) died: signal SIGKILL; respawning" in shoal.log()


def _housekeeper_back(node: Shoal, old: int) -> bool:
    try:
        return node.housekeeper_pid() != old
    except ValueError:  # none, or two for an instant
        return False


async def test_orphans_are_reaped_when_shoal_is_pid_1(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """In a container shoal may be PID 1: orphaned processes become its children, and
    must not pile up as zombies. (unshare gives shoal a PID namespace of its own.)"""
    (tmp_path / "orphanapp.py").write_text(ORPHAN_APP)
    settings["app"] = {"module": "orphanapp:app"}
    settings["server"]["worker_num"] = 1
    node = Shoal(tmp_path, settings).start(
        app_path=tmp_path, wrapper=("unshare", "--pid", "--fork", "--kill-child=SIGTERM")
    )
    try:
        (master,) = node.child_pids()  # unshare's child: PID 1 in its namespace
        assert _status(master)["NSpid"].split()[-1] == "1"
        before = set(_children(master))
        async with client(node.url("ann"), welcome=None) as ann:
            await ann.request({"type": "orphan"}, "orphaned")

        def adopted() -> set[int]:
            return set(_children(master)) - before

        orphans = wait_until(adopted, 5, "the orphan to be handed to shoal's master")
        wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in orphans), 5, "reaping")
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(node.child_pids()[0], signal.SIGTERM)
        node.stop()


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _status(int(entry.name)).get("PPid") == str(pid):
            found.append(int(entry.name))
    return found


async def test_max_connection_holds_against_a_burst(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """Before: admission read a count updated only after each connection's Redis round
    trip, so 80 handshakes at once all passed a limit of 50."""
    settings["server"].update(worker_num=1, max_connection=50)
    node = Shoal(tmp_path, settings).start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            refusals: list[int] = []

            async def attempt() -> bool:
                try:
                    ws = await stack.enter_async_context(
                        connect(node.url(), open_timeout=10 * SCALE, close_timeout=1)
                    )
                except InvalidStatus as exc:
                    refusals.append(exc.response.status_code)
                    return False
                await ws.recv()  # welcome: registered, not just upgraded
                return True

            admitted = await asyncio.gather(*(attempt() for _ in range(80)))
            assert sum(admitted) == 50
            assert refusals == [http.HTTPStatus.SERVICE_UNAVAILABLE] * 30
            health = node.health()
            assert health is not None and health["connections"] == 50
        # Released as they close: room again.
        wait_until(lambda: (node.health() or {}).get("connections") == 0, 5, "release")
        async with client(node.url("late")):
            pass
    finally:
        node.stop()


async def test_max_connection_across_two_workers(tmp_path: Path, settings: dict[str, Any]) -> None:
    """Across workers the count is shared; two handshakes in the same microsecond on two
    workers may both pass, so the node may exceed the limit by worker_num - 1 at most."""
    settings["server"].update(worker_num=2, max_connection=50)
    node = Shoal(tmp_path, settings).start()
    try:
        async with contextlib.AsyncExitStack() as stack:

            async def attempt() -> bool:
                try:
                    ws = await stack.enter_async_context(
                        connect(node.url(), open_timeout=10 * SCALE, close_timeout=1)
                    )
                except InvalidStatus:
                    return False
                await ws.recv()
                return True

            admitted = sum(await asyncio.gather(*(attempt() for _ in range(80))))
            assert 50 <= admitted <= 51, admitted
    finally:
        node.stop()
