"""Floods that hurt no one else: per-connection rate limits, and backpressure toward Redis.

Before these limits, one client sending 1 KB broadcasts as fast as it could (43k/s) got
every ordinary receiver closed with 4000 within 3 s, and Redis dropped the workers'
subscriber connections (its pub/sub output-buffer limit) 9 times in 10 s, losing what was
published meanwhile; with 1 MB broadcasts a worker grew 140 MB/s.

The floods run against Redis's own defaults (`client-output-buffer-limit pubsub 32mb 8mb
60`), as an external Redis has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from support import FAST_REDIS, SCALE, RedisServer, Shoal, eventually, scrape

MB = 1024 * 1024
FLOOD_SECONDS = 5.0
RATE_LIMITED = "Rate limit exceeded"


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def subscribers(client: redis.Redis, prefix: str) -> dict[str, tuple[int, int]]:
    """The deployment's subscriber connections in Redis: name -> (client id, omem)."""
    found = {}
    for entry in client.client_list(_type="pubsub"):
        if entry["name"].startswith(f"{prefix}:sub:"):
            found[entry["name"]] = (int(entry["id"]), int(entry["omem"]))
    return found


async def open_ws(node: Shoal, user: str) -> tuple[ClientConnection, str]:
    """A plain websockets client and the worker it landed on."""
    ws = await connect(node.url(user), open_timeout=10 * SCALE, max_size=None)
    welcome = json.loads(await ws.recv())
    return ws, welcome["connection_id"].rsplit(".", 1)[0]


@dataclass
class Receiver:
    ws: ClientConnection
    worker: str
    numbers: list[int] = field(default_factory=list)
    flood: int = 0
    closed: int | None = None

    async def run(self) -> None:
        try:
            async for raw in self.ws:
                if '"message":"n:' not in raw[:120]:  # a flood message: not parsed
                    self.flood += 1
                    continue
                message = json.loads(raw)
                self.numbers.append(int(message["message"][2:]))
        except ConnectionClosed:
            pass
        self.closed = self.ws.close_code


# The flooder runs in a process of its own, so that its sending does not starve the
# test's receivers of their loop. It sends broadcasts of SIZE bytes as fast as its
# connection takes them for SECONDS, reconnecting to the same worker whenever the server
# closes it, and prints what it sent, the refusals it read and the closes it got.
FLOODER = """
import asyncio, contextlib, json, sys, time
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

url, worker, size, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
figures = {"sent": 0, "refused": 0, "closes": {}}

async def read(ws):
    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            if "Rate limit exceeded" in raw[:80]:
                figures["refused"] += 1

async def main():
    frame = json.dumps({"type": "broadcast", "message": "x" * size})
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ws = await connect(url, max_size=None)
        except InvalidStatus:  # 503 while Redis is saturated: the flood goes on
            figures["refused_handshakes"] = figures.get("refused_handshakes", 0) + 1
            await asyncio.sleep(0.05)
            continue
        try:
            welcome = json.loads(await ws.recv())
            if welcome["connection_id"].rsplit(".", 1)[0] != worker:
                await ws.close()
                continue
        except ConnectionClosed:
            pass
        else:
            reader = asyncio.create_task(read(ws))
            with contextlib.suppress(ConnectionClosed):
                while time.monotonic() < deadline:
                    await ws.send(frame)
                    figures["sent"] += 1
            await ws.close()
            await reader
        code = str(ws.close_code)
        figures["closes"][code] = figures["closes"].get(code, 0) + 1
    print(json.dumps(figures))

asyncio.run(main())
"""


async def run_flooders(
    node: Shoal, worker: str, size: int, seconds: float, count: int
) -> list[dict[str, Any]]:
    """`count` flooder processes on `worker`; what each reported."""
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOODER, node.url("flooder"), worker, str(size), str(seconds),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(count)
    ]  # fmt: skip
    reports = []
    for process in processes:
        out, err = await asyncio.wait_for(process.communicate(), (seconds + 30) * SCALE)
        assert process.returncode == 0, err.decode()[-2000:]
        reports.append(json.loads(out))
    return reports


@dataclass
class Figures:
    receivers: list[Receiver]
    flooders: list[dict[str, Any]]
    numbered: int
    largest_backlog: int
    rss_growth: int
    subscriber_ids: set[int]


@contextlib.asynccontextmanager
async def spread(node: Shoal, per_worker: int) -> AsyncIterator[list[Receiver]]:
    """`per_worker` receivers on each of the node's two workers. The connections that
    landed on a worker already served are closed before the flood: left open and unread,
    each would take websockets' whole close timeout to close after it."""
    async with contextlib.AsyncExitStack() as stack:
        by_worker: dict[str, list[ClientConnection]] = {}
        spare = []
        for n in range(400):
            ws, worker = await open_ws(node, f"r{n}")
            group = by_worker.setdefault(worker, [])
            if len(group) < per_worker:
                stack.push_async_callback(ws.close)
                group.append(ws)
            else:
                spare.append(ws)
            if len(by_worker) == 2 and all(len(g) == per_worker for g in by_worker.values()):
                break
        else:  # pragma: no cover - SO_REUSEPORT would have to be broken
            raise AssertionError("receivers never spread over both workers")
        await asyncio.gather(*(ws.close() for ws in spare))
        yield [Receiver(ws, worker) for worker, group in by_worker.items() for ws in group]


def slow_down(pid: int, stop: threading.Event, running: float = 0.1) -> None:
    """Let `pid` run only `running` of each 100 ms (SIGSTOP, SIGCONT): a worker that
    reads its subscriber connection slower than the others publish, as one on a
    busier machine does."""
    while not stop.is_set():
        os.kill(pid, signal.SIGSTOP)
        stop.wait(0.1 * (1 - running))
        os.kill(pid, signal.SIGCONT)
        stop.wait(0.1 * running)
    os.kill(pid, signal.SIGCONT)


async def flood(
    node: Shoal,
    redis_server: RedisServer,
    prefix: str,
    *,
    size: int,
    flooders: int = 1,
    slow_reader: bool = False,
    drain: bool = True,
) -> Figures:
    """`flooders` clients of one worker flood `size`-byte broadcasts for 5 s, while a
    sender broadcasts a numbered stream (20/s) to 10 receivers on that worker and 10 on
    the other. Redis's subscriber connections and the workers' memory are sampled every
    50 ms meanwhile. With `drain`, the receivers then read all that was sent to them;
    without, they are dropped once the flood ends."""
    client = redis_server.client()
    pids = node.worker_pids()
    before = subscribers(client, prefix)
    assert len(before) == 2, before
    ids: set[int] = {id_ for id_, _ in before.values()}
    rss_before = {pid: rss(pid) for pid in pids}
    rss_peak = dict(rss_before)
    largest = 0
    async with spread(node, 10) as receivers:
        reading = [asyncio.create_task(r.run()) for r in receivers]
        sender, _ = await open_ws(node, "sender")
        # Everyone's broadcasts reach the sender too: it reads them, as any client does.
        draining = asyncio.create_task(Receiver(sender, "").run())
        stop = asyncio.Event()

        async def monitor() -> None:
            nonlocal largest
            while not stop.is_set():
                for id_, omem in (await asyncio.to_thread(subscribers, client, prefix)).values():
                    ids.add(id_)
                    largest = max(largest, omem)
                for pid in pids:
                    rss_peak[pid] = max(rss_peak[pid], rss(pid))
                await asyncio.sleep(0.05)

        watching = asyncio.create_task(monitor())
        flooding = asyncio.create_task(
            run_flooders(node, receivers[0].worker, size, FLOOD_SECONDS, flooders)
        )
        slowing = threading.Event()
        if slow_reader:
            (other,) = [pid for pid in pids if f".{pid}" == receivers[-1].worker[-len(f".{pid}") :]]
            threading.Thread(target=slow_down, args=(other, slowing), daemon=True).start()
        numbered = 0
        with contextlib.suppress(ConnectionClosed):  # a sender closed fails the checks
            while not flooding.done():
                await sender.send(json.dumps({"type": "broadcast", "message": f"n:{numbered}"}))
                numbered += 1
                await asyncio.sleep(0.05)
        reports = await flooding
        slowing.set()
        stop.set()
        await watching

        async def all_arrived() -> bool:
            return all(len(r.numbers) >= numbered or r.closed for r in receivers)

        if drain:
            # The receivers (this process, plain websockets) still read what the flood
            # left queued for them: up to a minute on a slow machine, however fast shoal is.
            await eventually(all_arrived, 90, "every numbered message at every receiver")
        else:
            for ws in (sender, *(r.ws for r in receivers)):
                ws.transport.abort()
        await sender.close()
        await draining
        for r in receivers:
            await r.ws.close()
        await asyncio.gather(*reading)
    growth = max(rss_peak[pid] - rss_before[pid] for pid in pids)
    return Figures(receivers, reports, numbered, largest, growth, ids)


def check(
    figures: Figures,
    node: Shoal,
    rss_bound: int,
    record: Callable[[str, object], None],
    *,
    receivers_unharmed: bool = True,
) -> None:
    """Redis's subscriber connections never dropped, the workers' memory below
    `rss_bound`, and (`receivers_unharmed`) no receiver closed or missing a numbered
    message."""
    sent = sum(report["sent"] for report in figures.flooders)
    refused = sum(report["refused"] for report in figures.flooders)
    closes = [report["closes"] for report in figures.flooders]
    record("flood_messages_sent", sent)
    record("flood_refused_rate_limited", refused)
    record("flood_closes", json.dumps(closes))
    record("numbered_messages", figures.numbered)
    record("flood_messages_per_receiver", max(r.flood for r in figures.receivers))
    record("largest_subscriber_backlog_bytes", figures.largest_backlog)
    record("worker_rss_growth_bytes", figures.rss_growth)
    closed = [r.closed for r in figures.receivers if r.closed not in (None, 1000)]
    record("receivers_closed", len(closed))
    if receivers_unharmed:
        assert not closed, f"receivers closed by the server: {closed}"
        for r in figures.receivers:
            assert r.numbers == list(range(figures.numbered)), (r.worker, len(r.numbers))
    # Redis never dropped a subscriber: the same two connections all along.
    assert len(figures.subscriber_ids) == 2, figures.subscriber_ids
    samples = scrape(node)
    assert samples["shoal_redis_reconnects_total", ""] == 0
    assert samples["shoal_redis_errors_total", "lost"] == 0
    assert figures.rss_growth < rss_bound, f"a worker grew {figures.rss_growth / 1e6:.0f} MB"


@pytest.fixture
def flood_settings(own_redis: RedisServer, settings: dict[str, Any]) -> dict[str, Any]:
    # Redis as installed: its default pub/sub output-buffer limit.
    settings["redis"]["url"] = own_redis.url
    # Redis's own timings: a slowed worker reads its health check's answer only after
    # its backlog, which the tests' short timeouts would take for a dead connection.
    for key in FAST_REDIS:
        del settings["redis"][key]
    settings["log"]["connections"] = False
    return settings


async def test_a_flood_of_small_broadcasts_hurts_no_one_else(
    tmp_path: Path,
    flood_settings: dict[str, Any],
    own_redis: RedisServer,
    prefix: str,
    record_property: Callable[[str, object], None],
) -> None:
    node = Shoal(tmp_path, flood_settings).start()
    try:
        figures = await flood(node, own_redis, prefix, size=1024)
        check(figures, node, 64 * MB, record_property)
        (report,) = figures.flooders
        assert report["refused"] > 0 and report["closes"].get("1008", 0) > 0, report
    finally:
        node.stop()


async def test_a_flood_of_megabyte_broadcasts_keeps_memory_bounded(
    tmp_path: Path,
    flood_settings: dict[str, Any],
    own_redis: RedisServer,
    prefix: str,
    record_property: Callable[[str, object], None],
) -> None:
    flood_settings["server"].update(max_message_size=2 * MB, buffer_output_size=4 * MB)
    flood_settings["limits"] = {"bytes_burst": 2 * MB}
    node = Shoal(tmp_path, flood_settings).start()
    try:
        figures = await flood(node, own_redis, prefix, size=MB)
        check(figures, node, 128 * MB, record_property)
        (report,) = figures.flooders
        assert report["refused"] > 0 and report["closes"].get("1008", 0) > 0, report
    finally:
        node.stop()


async def test_without_rate_limits_backpressure_keeps_redis_from_dropping_subscribers(
    tmp_path: Path,
    flood_settings: dict[str, Any],
    own_redis: RedisServer,
    prefix: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Rate limits lifted, two clients flood as fast as they can: they are paced by
    what the workers read, so no subscriber's backlog in Redis nears its limit.

    Both flooders are on the first worker, and the second reads at a tenth of its speed:
    its subscriber backlog, which only the CLIENT LIST watch sees, is what paces them.
    Without that, its backlog passed Redis's limit within seconds."""
    flood_settings["limits"] = {"messages_per_second": None, "bytes_per_second": None}
    node = Shoal(tmp_path, flood_settings).start()
    try:
        # Receivers in this test process cannot read a flood paced only by the workers:
        # they may be closed as slow consumers, which is what 4000 is for; what is left
        # queued for them when the flood ends (minutes of reading) is not read.
        figures = await flood(
            node, own_redis, prefix, size=1024, flooders=2, slow_reader=True, drain=False
        )
        check(figures, node, 128 * MB, record_property, receivers_unharmed=False)
        assert figures.largest_backlog < 8 * MB  # Redis's default soft limit

        async def waited() -> bool:
            return scrape(node)["shoal_publish_waits_total", ""] > 0

        await eventually(waited, 5, "publishes that waited, in the metrics")
    finally:
        node.stop()


async def replies(ws: ClientConnection, count: int) -> list[str]:
    """The `message` of each of the next `count` error replies."""
    return [
        json.loads(await asyncio.wait_for(ws.recv(), 5 * SCALE))["message"] for _ in range(count)
    ]


async def test_messages_over_the_rate_are_refused_and_the_rate_recovers(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """A burst of 5 passes (each answered "Not in room"), the next 15 are refused with
    no effect; after a pause at 2 messages/s, messages pass again."""
    settings["limits"] = {"messages_per_second": 2, "burst": 5, "max_refused": 1000}
    node = Shoal(tmp_path, settings).start()
    try:
        ws, _ = await open_ws(node, "eager")
        leave = json.dumps({"type": "leave_room", "room": "r"})
        for _ in range(20):
            await ws.send(leave)
        answers = await replies(ws, 20)
        assert answers[:5] == ["Not in room"] * 5
        assert answers.count(RATE_LIMITED) >= 14  # one token may refill while sending

        async def counted() -> bool:
            return scrape(node)["shoal_rate_limited_total", ""] >= 14

        await eventually(counted, 5, "the refusals counted in the metrics")

        async def passes() -> bool:
            await ws.send(leave)
            return (await replies(ws, 1)) == ["Not in room"]

        await eventually(passes, 5, "a message allowed again", interval=0.2)
        await ws.close()
    finally:
        node.stop()


async def test_sustained_abuse_closes_with_1008(tmp_path: Path, settings: dict[str, Any]) -> None:
    """The 5th refusal within 10 s closes the connection with 1008; others are unharmed."""
    settings["limits"] = {"messages_per_second": 1, "burst": 2, "max_refused": 5}
    node = Shoal(tmp_path, settings).start()
    try:
        bystander, _ = await open_ws(node, "bystander")
        ws, _ = await open_ws(node, "abuser")
        for _ in range(10):
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "leave_room", "room": "r"}))
        answers = []
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                answers.append(json.loads(raw)["message"])
        assert answers[:2] == ["Not in room"] * 2
        assert answers[2:] == [RATE_LIMITED] * 5
        assert ws.close_code == 1008 and ws.close_reason == RATE_LIMITED
        await bystander.send(json.dumps({"type": "leave_room", "room": "r"}))
        assert await replies(bystander, 1) == ["Not in room"]
        await bystander.close()
    finally:
        node.stop()


async def test_binary_frames_and_bytes_are_limited_too(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """The echo application takes raw frames (`on_frame`): a byte rate of 1000 B/s with a
    burst of 1000 echoes one 600-byte frame and refuses the next."""
    settings["app"] = {"module": "echo"}
    settings["server"]["max_message_size"] = 1000
    settings["limits"] = {"bytes_per_second": 1000, "bytes_burst": 1000, "max_refused": 100}
    node = Shoal(tmp_path, settings).start()
    try:
        async with connect(node.url(), open_timeout=10 * SCALE) as ws:
            frame = b"\x01" * 600
            await ws.send(frame)
            await ws.send(frame)
            assert await asyncio.wait_for(ws.recv(), 5 * SCALE) == frame
            refusal = json.loads(await asyncio.wait_for(ws.recv(), 5 * SCALE))
            assert refusal == {"type": "error", "message": RATE_LIMITED}
    finally:
        node.stop()
